"""Download-free image tasks: an offline suite in the spirit of VTAB-1k.

The project must run offline, so every task is rendered with numpy from a seed
(or, for ``digits``, from scikit-learn's bundled 8x8 digits) instead of being
downloaded.  ``SUITE`` lists the downstream tasks, each with 1,000 training
examples plus ``val`` (model selection), ``calib`` and ``test`` splits:

- natural-like: ``digits`` (scikit-learn digits, upscaled, placed and coloured
  at random on textured backgrounds), ``textures`` (8 procedural texture families);
- structured: ``count`` (how many objects, 1-6), ``orientation`` (angle of a bar,
  8 bins over 180 degrees);
- distribution shift: ``shapes-shift`` (the upstream shapes inverted, colour-cast
  and noisy);
- unseen classes: ``shapes-downstream`` (10 shapes absent upstream, on textured,
  cluttered backgrounds).

The embedded backbone is pre-trained on ``upstream-mix`` (upstream shapes +
random stroke glyphs, 30 classes), which no suite task shares classes with
except the shifted one, by design.

One module a job; import from the one you need (this package re-exports nothing):

- ``common.data.tasks``: the task registry (``TaskSpec``, ``TASKS``, ``SUITE``, ``get_task``, ``SPLITS``);
- ``common.data.shapes``: the shape vocabulary (boolean masks) the shape tasks draw;
- ``common.data.render``: the numpy renderers, one seeded stream per (task, split, seed, chunk);
- ``common.data.splits``: ``make_split`` (rendered splits, cached as uint8 ``.npz`` arrays, never pickles,
  under ``$TASKEDGE_CACHE``, default ``~/.cache/taskedge-fl``), ``cache_dir``, ``fingerprint``, ``normalize``;
- ``common.data.loading``: images from elsewhere as a task's tensors (a user's folder, a Hugging Face
  dataset) and tensors as a Hugging Face dataset.
"""
