"""The trainer's parts, used by the train stage (``renio_core/stages/train.py``): losses.py (the
table of losses), data.py (micro-batches), module.py (the student and its loss as one module),
parallel.py (torchrun), checkpoint.py (save, resume, ``--init-from``), score_in_step.py
(``renio run`` scoring the rollouts inside the train step)."""
