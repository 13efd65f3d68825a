"""DVC stage: the demo's beam data from the demo data set and its embeddings (see lever_lm.demo.beam_data)."""

from lever_lm.process import apply_process_settings

apply_process_settings()  # before anything imports torch

from lever_lm.demo.beam_data import main  # noqa: E402

if __name__ == "__main__":
    main()
