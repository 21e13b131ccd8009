"""The test vocabulary: ten labels in three groups, and the local emoji dictionary for nine of them.

tests/conftest.py writes them for the `labels_dir` and `emoji_file` fixtures; tests that count or name
labels read them here.
"""

LABELS = {
    "animals": ["cat", "dog", "horse", "bird"],
    "foods": ["banana", "coffee", "pizza"],
    "people": ["man", "woman", "astronaut"],
}
EMOJI = {"cat": "🐱", "dog": "🐕", "horse": "🐴", "bird": "🐦", "banana": "🍌", "coffee": "☕",
         "pizza": "🍕", "man": "👨", "woman": "👩"}
