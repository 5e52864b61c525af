"""Quality control: how far to trust one mask, and why.

* measures.py: what is measured on a mask, its probabilities and its scan (the same functions in training);
* ranges.py: what is learned from the training labels and scans (Plausibility), once, into the contract;
* orientation.py: the training families' atrium atlases, and how a mask's shape fits them permuted or mirrored;
* calibration.py: the confidence score and its calibration into an estimated Dice (ScoreCalibration);
* evidence.py: the measures of one mask, taken once into one record (Evidence);
* rules.py: the rules over the evidence, the one rule list and its run-time and calibration profiles;
* refusal.py: the voxel spacing and field of view beyond which a scan is refused, from the same ranges;
* report.py: assess (the run-time verdict) and its QCReport; review_order, the order to check masks in.
"""

from .calibration import (
    CALIBRATED_SCORES,
    SCORE_NAME,
    SILENT_BELOW,
    FitConfig,
    ScoreCalibration,
    fit_score_calibration,
    pooled_score_calibration,
    soft_dice_score,
    spearman,
)
from .evidence import Evidence, gather
from .measures import (
    ImageMeasures,
    MeasureConfig,
    bounding_slices,
    component_sizes,
    face_shares,
    image_sharpness,
    intensity_skewness,
    interior_contrast,
    interior_rank,
    mask_measures,
    noise_level,
    noise_sigma,
    saturation,
    scan_geometry,
)
from .orientation import OrientationAtlases, OrientationMatch, learn_orientation_atlases, orientation_evidence
from .ranges import DEFAULT_INPUT_MARGIN, Plausibility, RangeConfig, learn_plausibility, scans_plausibility
from .refusal import max_fov_mm, refusal_reason, spacing_bounds
from .report import VERDICTS, QCReport, assess, review_order
from .rules import (
    CALIBRATION_RULES,
    RULES,
    NamedFinding,
    QCConfig,
    Standards,
    clipped_intensities,
    findings,
    input_reasons,
    judge,
    localiser_flag,
    low_contrast,
    mask_flag,
    noisy_scan,
)

__all__ = [
    "CALIBRATED_SCORES", "CALIBRATION_RULES", "DEFAULT_INPUT_MARGIN", "RULES", "SCORE_NAME", "SILENT_BELOW",
    "VERDICTS", "Evidence", "FitConfig", "MeasureConfig", "NamedFinding", "Plausibility", "QCConfig", "QCReport",
    "RangeConfig", "ScoreCalibration", "Standards", "assess", "bounding_slices", "component_sizes", "face_shares",
    "findings", "fit_score_calibration", "gather", "image_sharpness", "input_reasons", "intensity_skewness",
    "ImageMeasures", "clipped_intensities", "interior_contrast", "saturation",
    "interior_rank", "judge", "learn_plausibility", "localiser_flag", "low_contrast", "mask_flag", "mask_measures",
    "max_fov_mm", "noise_level", "noise_sigma", "noisy_scan", "pooled_score_calibration", "refusal_reason",
    "scan_geometry", "scans_plausibility", "soft_dice_score", "spacing_bounds", "spearman",
    "OrientationAtlases", "OrientationMatch", "learn_orientation_atlases", "orientation_evidence", "review_order",
]
