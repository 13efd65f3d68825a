"""DVC stage: the demo's trained tiny Qwen2.5-VL (see lever_lm.demo.train_vlm)."""

from lever_lm.demo.train_vlm import main

if __name__ == "__main__":
    main()
