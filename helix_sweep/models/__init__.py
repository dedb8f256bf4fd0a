"""HELIX model family: torch only, no Ray, no MLflow."""

from helix_sweep.models.blocks import AttentionBlock, BiMambaBlock
from helix_sweep.models.classifier import HelixClassifier, build_classifier, build_classifier_from, classifier_params
from helix_sweep.models.mamba import Mamba
from helix_sweep.models.matching import bimamba_params, count_params, mamba_params, matched_d_ffn
from helix_sweep.models.scan import selective_scan

__all__ = [
    "AttentionBlock", "BiMambaBlock", "HelixClassifier", "Mamba", "bimamba_params",
    "build_classifier", "build_classifier_from", "classifier_params", "count_params", "mamba_params",
    "matched_d_ffn", "selective_scan",
]
