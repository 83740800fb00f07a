"""Unlearning methods, one per file, all with one shape (DESIGN.md, :mod:`.base`).

Each factory takes the method's hyperparameters as keyword arguments and returns a
:class:`Method` ``(init, update)``; :func:`jaxunlearn.loop.run` runs any of them, training included.
A new method is one file here plus one line below. Data-dependent inputs
are computed beforehand by the library functions next to each method
(:func:`saliency_mask`, :func:`fisher_diagonal`, :func:`group_weights`, ...).

=============  ====================================  ==========================================
method         factory                               reads / input
=============  ====================================  ==========================================
train          :func:`train`                         train (the original recipe)
Retrain        :func:`retrain`                       retain (fresh variables); ``weights.group_weights``
FT / CF        :func:`finetune`                      retain
CF-k           :func:`cf_k`                          retain; last-k mask
EU-k           :func:`eu_k`                          retain; fresh variables, last-k mask
GA             :func:`gradient_ascent`               forget
GA_FT          :func:`neggrad_plus`                  forget + retain
RL             :func:`random_labels`                 forget + retain
SalUn          :func:`salun`                         forget + retain; :func:`saliency_mask`
L1-sparse      :func:`l1_sparse`                     retain
BS             :func:`boundary_shrink`               forget
SCRUB          :func:`scrub`                         forget + retain
Bad-T          :func:`bad_teacher`                   forget + retain; random teacher
Fisher         :func:`fisher_forgetting`             one-shot; :func:`fisher_diagonal`, :func:`retain_gradient`
NTK            :func:`ntk_forgetting`                one-shot, forget + retain
IF             :func:`influence_unlearning`          one-shot, forget; inverse-HVP solver
MIU            :func:`miu`                           forget + retain with groups; :func:`check_miu_estimators`
=============  ====================================  ==========================================
"""

from jaxunlearn.methods.base import (
    Method, MethodState, first_pass, gradient_step)
from jaxunlearn.methods.train import train, retrain
from jaxunlearn.methods.finetune import finetune, cf_k
from jaxunlearn.methods.eu_k import eu_k
from jaxunlearn.methods.gradient_ascent import gradient_ascent
from jaxunlearn.methods.neggrad import neggrad_plus
from jaxunlearn.methods.random_labels import random_labels
from jaxunlearn.methods.salun import salun, saliency_mask, forget_gradient
from jaxunlearn.methods.l1_sparse import l1_sparse
from jaxunlearn.methods.boundary_shrink import boundary_shrink, neighbour_labels
from jaxunlearn.methods.scrub import scrub
from jaxunlearn.methods.bad_teacher import bad_teacher
from jaxunlearn.methods.fisher import (fisher_diagonal, fisher_forgetting, retain_gradient,
                                      newton_step_size)
from jaxunlearn.methods.ntk import ntk_forgetting
from jaxunlearn.methods.influence_removal import influence_unlearning
from jaxunlearn.methods.miu import miu, check_estimators as check_miu_estimators
from jaxunlearn.methods.fairness_gap_penalty import fairness_gap_penalty, with_fairness_gap_penalty
