"""Training one run: the device plan, the two-phase recipe (`training.execute_run`), the head
search on cached features, the fine-tune's resumable state and the LR range test."""
