"""Data: load sources, detect and render formats, tokenize with loss masks, report."""
