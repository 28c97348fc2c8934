"""The transform, counts -> cell sentences: input readers, QC and normalization, the ranking and
sentence kernels, the rank-expression fit, the outputs (files or memory) and the fast writers."""
