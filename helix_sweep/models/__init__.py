"""HELIX model family: torch only, no Ray, no MLflow."""

from helix_sweep.models.blocks import AttentionBlock, BiMambaBlock
from helix_sweep.models.classifier import HelixClassifier, build_classifier, build_classifier_from, classifier_params
from helix_sweep.models.mamba import Mamba
from helix_sweep.models.matching import bimamba_params, count_params, mamba_params, matched_d_ffn
from helix_sweep.models.scan import (ScanImplUnavailable, resolve_scan_impl, scan_impl_status, selective_scan,
                                     selective_scan_pure, selective_scan_triton)

__all__ = [
    "AttentionBlock", "BiMambaBlock", "HelixClassifier", "Mamba", "ScanImplUnavailable", "bimamba_params",
    "build_classifier", "build_classifier_from", "classifier_params", "count_params", "mamba_params",
    "matched_d_ffn", "resolve_scan_impl", "scan_impl_status", "selective_scan", "selective_scan_pure",
    "selective_scan_triton",
]
