"""Evaluation metrics: plain floats, or sufficient statistics that add across batches and shards.

* :mod:`~jaxunlearn.metrics.classification`: accuracy, per-group and worst-group accuracy, and the
  confusion counts every classification and fairness metric derives from.
* :mod:`~jaxunlearn.metrics.fairness`: DP and EOP of hard predictions (seed 004), De Min's EO.
* :mod:`~jaxunlearn.metrics.fairness_gap`: Tran & Woo's per-layer fairness-gap, streamed.
* :mod:`~jaxunlearn.metrics.mia`: membership-inference forget quality (threshold attack, AUC).
* :mod:`~jaxunlearn.metrics.unlearning`: Avg. Gap and ToW against the retrained model.
"""

from jaxunlearn.metrics.classification import (
    accuracy,
    accuracy_from_counts,
    confusion_counts,
    count_predictions,
    group_accuracy,
    group_accuracy_from_counts,
    predicted_labels,
    worst_group_accuracy,
    worst_group_accuracy_from_counts,
)
from jaxunlearn.metrics.fairness import (
    demographic_parity,
    demographic_parity_from_counts,
    equal_opportunity,
    equal_opportunity_from_counts,
    equalized_odds,
    equalized_odds_from_counts,
)
from jaxunlearn.metrics.fairness_gap import (
    class_variances,
    fairness_gap,
    fairness_gap_finalize,
    fairness_gap_init,
    fairness_gap_merge,
    fairness_gap_stats,
    fairness_gap_update,
)
from jaxunlearn.metrics.mia import (
    ThresholdAttack,
    fit_threshold_attack,
    membership_scores,
    mia,
    mia_from_model,
    predict_member,
    roc_auc,
)
from jaxunlearn.metrics.unlearning import GAP_KEYS, TOW_KEYS, avg_gap, tow
