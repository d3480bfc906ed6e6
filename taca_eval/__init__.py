"""Measuring what TACA does to prompt following: a compositional world with exact ground truth, a checker that
reads its images, and (for users' models) the suite runner. Importable without ComfyUI or torch."""
