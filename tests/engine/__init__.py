"""Tests of the training engine: the trainer (test_trainer*), checkpoints (test_checkpoint*) and
resume (test_resume*)."""
