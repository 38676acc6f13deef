"""Downstream evaluation: the paper's fine-tuning protocol, the usual linear probe and kNN,
low-label draws, paired intervals, and the comparison runner behind Tables 2-3 and Figs. 2-3.

One concept per module, in the order an evaluation runs:

- ``settings``: ``EvalSettings``, everything an evaluation is run with (one object).
- ``splits``: label draws (``plan_draws``), stratified splits, labels of a dataset.
- ``encoders``: what is evaluated (module, "random", baseline, checkpoint path).
- ``images`` / ``features``: how images are shown to an encoder; frozen features.
- ``protocols/``: ``finetune``, ``linear``, ``knn`` and their ``scores``.
- ``leakage``: refuses encoders whose pretraining saw a test image.
- ``compare``: ``compare_encoders``, the runner; ``paired``: bootstrap intervals.
- ``report``: results.md / .csv / .png; ``convergence``: Figs. 2-3.
- ``run``: paths in, results out (``medp2x evaluate``); ``paper``: one of the paper's ten
  datasets in, results out (bundles/evaluate.json).

The label budget (docs/evaluation.md): a draw of X % of the training labels is all a
protocol learns *or selects* from. ``selection="none"`` (default, the paper's setting): a
fixed number of fine-tuning epochs, a fixed probe regularisation, the final model tested.
``selection="draw"``: a stratified ``val_fraction`` of each draw is held out to choose the
epoch / probe strength; the rest is trained on. ``selection="val"``: a given validation split
chooses (labels outside the budget; the table says so).
"""
