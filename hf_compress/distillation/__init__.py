"""Distillation building blocks on bare modules and tensors (no Trainer imports).

losses   KD divergences, masks, hidden-state and attention-map losses
layers   student→teacher layer maps and width projections
teacher  freezing / placing / low-bit loading of teachers
student  student_from_teacher (DistilBERT-style block copy)
cache    cache_teacher_logits and the collator that keeps its columns
"""
