"""Evaluation of ICD choice: in-context VQA accuracy on the validation split (see `lever_lm.evaluation.icl`)."""
