"""Distillation technique on bare modules and tensors: `DistillationConfig` (config.py), losses, teachers, students.

Imports no trainer, callback, loading or command code; `DistillationTrainer` (trainers/) drives it.
config   DistillationConfig

losses   KD divergences, masks, hidden-state and attention-map losses
layers   student→teacher layer maps and width projections
teacher  freezing / placing / low-bit loading of teachers
student  student_from_teacher (DistilBERT-style block copy)
cache    cache_teacher_logits and the collator that keeps its columns
"""
