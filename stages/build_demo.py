"""DVC stage: build the embedded default (demo VQA data set + tiny models) under data/demo."""

from lever_lm.demo.build import main

if __name__ == "__main__":
    main()
