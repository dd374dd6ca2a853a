"""The two distillation losses on random embeddings, as any PML loss is used."""

import torch
from pytorch_metric_learning import losses

from pml_mutual import GramCorrelationLoss, MutualGramLoss

torch.manual_seed(0)
labels = torch.arange(8).repeat_interleave(4)
teacher = torch.randn(32, 64)  # F_o(x): frozen old model
student = (teacher + 0.3 * torch.randn(32, 64)).requires_grad_()  # F_p(x)
support = torch.randn(32, 64, requires_grad=True)  # F_s(x)

triplet = losses.TripletMarginLoss(margin=0.1)
corr = GramCorrelationLoss(temperature=4.0)  # L_corr(F_o → F_p), Eq. 1 / 5
mutual = MutualGramLoss(temperature=4.0)  # L_mutual(F_p ↔ F_s), Eq. 2

total = (
    triplet(student, labels)
    + triplet(support, labels)
    + 10 * corr(student, ref_emb=teacher)
    + 8 * mutual(student, ref_emb=support)
)
total.backward()
print(
    f"triplet(F_p)={triplet(student, labels).item():.4f}  L_corr={corr(student, ref_emb=teacher).item():.5f} "
    f" "
    f"L_mutual={mutual(student, ref_emb=support).item():.5f}  total={total.item():.4f}"
)
