"""What tests (and bench/) share, importable as tests.support.<module>; fixtures stay in tests/conftest.py.

models        the tiny random CLIP (local-dir:) and the engine on it
trained_clip  a tiny CLIP trained to name colours, and its pictures
engines       engines that fail, hang, run out of memory or wait, wrapped around the real one
images        image bytes: the one plain-image builder, encoded pictures, hand-built PNG headers
responses     the success and error shapes of the API, checked one way
vocabulary    the test labels and emoji
http_fixtures small loopback HTTP servers: image hosts, emoji APIs, the app for a browser
server        CLIP.sh and other servers as processes: clean environment, start, wait, stop
nginx         a real nginx on the shipped config
system        programs and users the system tests need (nginx, chromium, systemd-analyze, nobody)
guard         only tests marked `system` may start servers or system programs
waiting       waiting for a condition, and a watchdog against hangs
"""
