"""DVC stage: the demo's trained tiny CLIP (see lever_lm.demo.train_clip)."""

from lever_lm.demo.train_clip import main

if __name__ == "__main__":
    main()
