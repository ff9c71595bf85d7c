"""`python -m sftdist.demo`: regenerate the committed demo files."""

from sftdist.demo import HELDOUT_PATH, TRAIN_PATH, write_demo

write_demo()
print(f"wrote {TRAIN_PATH} and {HELDOUT_PATH}")
