"""OpenFlamingo-3B ported to plain torch (see `model` for the whole picture, `loading` for the files)."""
