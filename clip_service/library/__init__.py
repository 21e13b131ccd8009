"""Working through a photo library: walking it, reading images ahead, and writing a resumable output.

Shared by `python -m clip_service tag` (tagger.py) and, next, the photo index.
"""
