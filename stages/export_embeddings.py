"""DVC stage: CLIP embeddings of the training split (see lever_lm.models.v3.export_embeddings)."""

from lever_lm.process import apply_process_settings

apply_process_settings()  # before anything imports torch

from lever_lm.models.v3.export_embeddings import main  # noqa: E402

if __name__ == "__main__":
    main()
