"""Evaluation: ShapesEval (deterministic detector + GenEval scorer + fixed prompt suite).

Submodules are imported on use (``from sana_sprint.evaluation.suite import score_folder``) so
that importing this package stays cheap.
"""
