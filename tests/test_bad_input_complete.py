"""docs/bad_input.md is complete, and checkably so (issue 13).

(a) Every row id of the table has a case in tests/test_bad_input.py::CASES, or cites a named test elsewhere
    (`tests/<file>.py::<test>` in its text, and that test exists); every case has a row.
(b) Every `raise` in hf_compress/ is accounted for in RAISES below: a doc row id (or several, when one raise
    serves several cases), or "internal: <why a user cannot reach it>". A raise site is keyed by
    (module path under hf_compress/, enclosing function qualname, exception name, ordinal of that exception
    name within the function, in line order), so moving lines does not break the table. `raise` alone is
    keyed by the name "raise"; a raise of a factory call, by the name called.
(c) Every doc row is produced by at least one raise site listed here (no row documents a refusal nobody raises).

A new raise makes (b) fail with the exact line to paste into RAISES; when a refusal is one a user can reach,
add a row to docs/bad_input.md and a case to tests/test_bad_input.py too.
"""

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "hf_compress"
DOC = ROOT / "docs" / "bad_input.md"


def raise_sites() -> dict[tuple[str, str, str, str, int], int]:
    """{(module, qualname, exception, ordinal): line} for every `raise` statement under hf_compress/."""
    sites = {}
    for path in sorted(PKG.rglob("*.py")):
        module = path.relative_to(PKG).as_posix()
        found = []

        def visit(node, qual):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(child, qual + [child.name])
                    continue
                if isinstance(child, ast.Raise):
                    exc = child.exc
                    name = "raise" if exc is None else ast.unparse(exc.func if isinstance(exc, ast.Call) else exc)
                    found.append((".".join(qual) or "<module>", name, child.lineno))
                visit(child, qual)

        visit(ast.parse(path.read_text(), str(path)), [])
        count = Counter()
        for qual, name, line in sorted(found, key=lambda f: f[2]):
            count[qual, name] += 1
            sites[module, qual, name, count[qual, name]] = line
    return sites


def doc_rows() -> dict[str, str]:
    """{row id: the row's text} of the table in docs/bad_input.md."""
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `([\w-]+)` \|.*$", DOC.read_text(), re.M)}


def cited_tests(text: str) -> list[tuple[str, str]]:
    return re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)


def _test_exists(file: str, name: str) -> bool:
    path = ROOT / file
    if not path.exists():
        return False
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in ast.walk(tree))


def _cases() -> set[str]:
    import test_bad_input

    return set(test_bad_input.CASES)


def test_every_row_has_a_test_and_every_case_a_row():
    rows, cases = doc_rows(), _cases()
    untested, bad_cites = [], []
    for row, text in rows.items():
        cites = cited_tests(text)
        for file, name in cites:
            if not _test_exists(file, name):
                bad_cites.append(f"{row}: {file}::{name} does not exist")
        if row not in cases and not cites:
            untested.append(row)
    assert not untested, (f"rows of docs/bad_input.md with no case in tests/test_bad_input.py::CASES and no cited test "
                          f"(`tests/<file>.py::<test>` in the row): {untested}")
    assert not bad_cites, f"rows citing a test that does not exist: {bad_cites}"
    assert not cases - set(rows), f"cases of tests/test_bad_input.py with no row in docs/bad_input.md: {sorted(cases - set(rows))}"


def _entry(site) -> str:
    module, qual, name, n = site
    return f'"{module}": {{..., ("{qual}", "{name}", {n}): "<row id> | internal: <why a user cannot reach it>"}}'


def test_every_raise_site_is_accounted_for():
    sites = raise_sites()
    table = {(module, *key): value for module, entries in RAISES.items() for key, value in entries.items()}
    missing = [s for s in sites if s not in table]
    assert not missing, (
        f"{len(missing)} raise site(s) in hf_compress/ are not in RAISES of tests/test_bad_input_complete.py. "
        "Add each, keyed (qualname, exception, ordinal within the function), to its module's entry: a doc row id of "
        "docs/bad_input.md when a user can reach it (add the row and a case in tests/test_bad_input.py if it is new), "
        "else 'internal: <why a user cannot reach it>':\n"
        + "\n".join(f"  {_entry(s)}   # line {sites[s]}" for s in missing)
    )
    stale = sorted(s for s in table if s not in sites)
    assert not stale, f"RAISES lists raise sites that no longer exist (removed, renamed or reordered): {stale}"


def test_raise_table_names_real_rows_or_says_why_internal():
    rows = set(doc_rows())
    wrong = []
    for module, entries in RAISES.items():
        for key, value in entries.items():
            ids = value if isinstance(value, tuple) else (value,)
            for v in ids:
                if v.startswith("internal:"):
                    if len(v) < len("internal: ") + 10 or len(ids) > 1:
                        wrong.append((module, key, v))
                elif v not in rows:
                    wrong.append((module, key, v))
    assert not wrong, f"RAISES entries naming no row of docs/bad_input.md (or an internal without a reason): {wrong}"


def test_every_row_is_raised_somewhere():
    raised = set()
    for entries in RAISES.values():
        for value in entries.values():
            raised |= set(value if isinstance(value, tuple) else (value,))
    orphans = sorted(set(doc_rows()) - raised)
    assert not orphans, f"rows of docs/bad_input.md that no raise site in RAISES produces: {orphans}"


def test_the_table_is_sorted_by_module():
    assert list(RAISES) == sorted(RAISES)


R = "internal: "  # prefix of the reasons below
RAISES = {
    "__init__.py": {
        ("__getattr__", "AttributeError", 1): R + "Python's own AttributeError for a name hf_compress does not export (module __getattr__ protocol).",
    },
    "__main__.py": {
        ("<module>", "SystemExit", 1): R + "`python -m hf_compress` exits with main()'s status; not an error.",
    },
    "_config.py": {
        ("refuse_renamed.__init__", "TypeError", 1): "config-renamed-field",
    },
    "callbacks/_logs.py": {
        ("LogsForIntegrations.metrics_for_log", "NotImplementedError", 1): R + "abstract method; each callback implements it (pragma: no cover).",
    },
    "callbacks/_steps.py": {
        ("refuse_start_after_run", "ValueError", 1): ("clustering-start-after-run", "qat-start-after-run"),
    },
    "callbacks/clustering.py": {
        ("ClusteringCallback.__init__", "ValueError", 1): "clustering-config-and-kwargs",
        ("ClusteringCallback._restore", "ValueError", 1): "clustering-resume-damaged",
        ("ClusteringCallback.on_train_begin", "ValueError", 1): "clustering-distributed",
        ("ClusteringCallback.on_train_begin", "ValueError", 2): "fsdp2-clustering",
    },
    "callbacks/lowrank.py": {  # lowrank
        ("LowRankCallback.__init__", "ValueError", 1): "callback-config-and-kwargs",
        ("LowRankCallback.on_init_end", "ValueError", 1): "lowrank-distributed",
        ("LowRankCallback.on_train_begin", "ValueError", 1): "resume-run-length",
    },
    "callbacks/pruning.py": {
        ("PruningCallback.__init__", "ValueError", 1): "callback-config-and-kwargs",
        ("PruningCallback.on_train_begin", "ValueError", 1): "fsdp2-remove-pruned",
        ("PruningCallback.on_train_begin", "ValueError", 2): "resume-run-length",
        ("PruningCallback.on_train_begin", "ValueError", 3): "prune-grads-at-step-0",
    },
    "callbacks/qat.py": {
        ("QATCallback.__init__", "ValueError", 1): "callback-config-and-kwargs",
        ("QATCallback._refuse_mid_run_changes", "ValueError", 1): "lowrank-qat-order",
        ("QATCallback._refuse_shifted_groups", "ValueError", 1): "qat-group-pruned-inputs",
        ("QATCallback.on_train_begin", "ValueError", 1): "fsdp2-qat",
    },
    "checkpointing.py": {
        ("load_state", "ValueError", 1): "resume-cut-short",
        ("load_state", "ValueError", 2): "resume-config",
        ("check_state_tensors", "ValueError", 1): "resume-state-damaged",
        ("check_state_tensors", "ValueError", 2): "resume-state-damaged",
        ("check_state_tensors", "ValueError", 3): "resume-state-damaged",
        ("StatefulCallback.refuse_zero3", "ValueError", 1): "deepspeed-zero3",
        ("StatefulCallback.read_resume_state", "ValueError", 1): "resume-outside-output-dir",
        ("StatefulCallback.check_fingerprint", "ValueError", 1): "resume-other-weights",
    },
    "cli/__init__.py": {
        ("main", "raise", 1): R + "HF_COMPRESS_DEBUG re-raises the error main would print (the rows above), with its traceback.",
        ("<module>", "SystemExit", 1): R + "`python -m hf_compress.cli` exits with main()'s status; not an error.",
    },
    "cli/analyze.py": {  # sensitivity
        ("_configs", "ValueError", 1): "analyze-budget-flags",
    },
    "cli/checks.py": {
        ("check_config_keys", "ValueError", 1): "dry-config-on-saved-model",
        ("check_config_keys", "ValueError", 2): "dry-model-config-key",
        ("meta_model", "ValueError", 1): "model-not-found",
        ("meta_model", "ValueError", 2): "model-tokenizer-size",
        ("preflight", "ValueError", 1): "dry-student-config-alone",
        ("preflight", "ValueError", 2): "dry-num-labels-few",
        ("preflight", "ValueError", 3): "dry-max-length",
        ("preflight", "ValueError", 4): R + "the recipe's type check refuses a non-integer student.layers entry first (recipe-type).",
        ("preflight", "ValueError", 5): "dry-student-layers",
        ("preflight", "ValueError", 6): "dry-student-layers-repeat",
        ("preflight", "ValueError", 7): "dry-max-length",
        ("preflight", "ValueError", 8): "dry-layer-bits",
        ("_on_meta", "ValueError", 1): ("dry-nm-divisible", "dry-group-size"),
    },
    "cli/data.py": {
        ("DataConfig.__post_init__", "ValueError", 1): "data-max-length-small",
        ("DataConfig.__post_init__", "ValueError", 2): "data-samples",
        ("DataConfig.__post_init__", "ValueError", 3): "data-no-source",
        ("read_rows", "FileNotFoundError", 1): R + "load_rows reads only files it found or checked exist (data-file-missing).",
        ("read_rows", "ValueError", 1): "data-bad-json",
        ("read_rows", "ValueError", 2): "data-json-not-rows",
        ("read_rows", "ValueError", 3): "data-file-type",
        ("_json_lines", "ValueError", 1): "data-bad-line",
        ("_json_lines", "ValueError", 2): "data-line-not-object",
        ("_hub_rows", "raise", 1): R + "re-raised into load_rows, which catches it and names it in the data-missing message.",
        ("load_rows", "ValueError", 1): "data-eval-file-missing",
        ("load_rows", "FileNotFoundError", 1): "data-file-missing",
        ("load_rows", "FileNotFoundError", 2): "data-missing",
        ("_check_columns", "ValueError", 1): "data-empty",
        ("_check_columns", "ValueError", 2): "data-columns",
        ("check_rows", "ValueError", 1): "data-text-missing",
        ("check_rows", "ValueError", 2): "data-label-missing",
        ("check_rows", "ValueError", 3): "data-label-not-int",
        ("check_rows", "ValueError", 4): "data-label-name",
        ("check_rows", "ValueError", 5): "data-label-negative",
        ("check_rows", "ValueError", 6): "data-label-id-beyond-names",
        ("check_rows", "ValueError", 7): "data-label-range",
        ("check_rows", "ValueError", 8): "data-num-labels-one",
        ("_label_ids", "ValueError", 1): R + "check_rows runs on every split before the labels are mapped and refuses the same label naming its row (data-label-id-beyond-names).",
        ("lm_blocks", "ValueError", 1): "data-lm-too-short",
    },
    "cli/export.py": {
        ("run", "FileNotFoundError", 1): "onnx-no-config",
        ("run", "ValueError", 1): "onnx-exists",
    },
    "cli/models.py": {
        ("minilm_path", "ImportError", 1): "packaged-minilm-missing",
    },
    "cli/owned.py": {
        ("check_folder", "ValueError", 1): "teacher-folder-file",
        ("check_folder", "ValueError", 2): ("teacher-folder-foreign", "export-foreign-files"),
    },
    "cli/recipes.py": {
        ("ModelSection.__post_init__", "ValueError", 1): "recipe-model-name",
        ("ModelSection.__post_init__", "ValueError", 2): "recipe-model-task",
        ("ModelSection.__post_init__", "ValueError", 3): "recipe-num-labels",
        ("TeacherSection.__post_init__", "ValueError", 1): "recipe-teacher-low-bit",
        ("TeacherSection.__post_init__", "ValueError", 2): "recipe-teacher-empty-list",
        ("StudentSection.__post_init__", "ValueError", 1): "recipe-student-both",
        ("StudentSection.__post_init__", "ValueError", 2): "recipe-student-layers",
        ("Recipe.teacher_training_args", "ValueError", 1): "recipe-teacher-train-key",
        ("Recipe.teacher_training_args", "ValueError", 2): "teacher-train-resume",
        ("check_writable_dir", "ValueError", 1): "output-dir-file",
        ("check_writable_dir", "ValueError", 2): "output-dir-under-file",
        ("check_writable_dir", "ValueError", 3): "output-dir-read-only",
        ("check_output_places", "ValueError", 1): "export-over-model",
        ("check_output_places", "ValueError", 2): "export-over-run",
        ("check_types", "ValueError", 1): "recipe-type",
        ("build_section", "ValueError", 1): "recipe-section-not-mapping",
        ("build_section", "ValueError", 2): "recipe-renamed-field",
        ("build_section", "ValueError", 3): "recipe-unknown-field",
        ("build_section", "ValueError", 4): "recipe-missing-field",
        ("build_section", "ValueError", 5): R + "check_types refuses wrongly typed values first; a TypeError left over is a missing field (recipe-missing-field).",
        ("build_section", "ValueError", 6): ("recipe-section-invalid", "recipe-model-name", "recipe-model-task", "recipe-num-labels",
                                             "recipe-teacher-low-bit", "recipe-teacher-empty-list", "recipe-student-both",
                                             "recipe-student-layers", "data-max-length-small", "data-samples", "data-no-source",
                                             "report-batch-sizes", "report-positive", "report-warmup"),
        ("parse_override", "ValueError", 1): "override-no-equals",
        ("parse_override", "ValueError", 2): "override-bad-key",
        ("parse_override", "ValueError", 3): "override-bad-yaml",
        ("apply_overrides", "ValueError", 1): "override-list-index",
        ("apply_overrides", "ValueError", 2): "override-not-section",
        ("recipe_from_dict", "ValueError", 1): R + "load_recipe refuses a file that is not a mapping first (recipe-not-mapping).",
        ("recipe_from_dict", "ValueError", 2): "recipe-unknown-key",
        ("recipe_from_dict", "ValueError", 3): "recipe-missing-section",
        ("recipe_from_dict", "ValueError", 4): "recipe-section-not-mapping",
        ("recipe_from_dict", "ValueError", 5): R + "check_types refuses a teacher.train that is not a mapping first (recipe-type).",
        ("_RecipeLoader.construct_mapping", "ValueError", 1): "recipe-duplicate-key",
        ("read_yaml", "ValueError", 1): "recipe-alias-bomb",
        ("read_yaml", "ValueError", 2): ("recipe-duplicate-key", "recipe-alias-bomb"),
        ("read_yaml", "ValueError", 3): "recipe-bad-yaml",
        ("load_recipe", "FileNotFoundError", 1): "recipe-missing",
        ("load_recipe", "ValueError", 1): "recipe-folder",
        ("load_recipe", "ValueError", 2): "recipe-unreadable",
        ("load_recipe", "ValueError", 3): "recipe-not-mapping",
        ("resolve_spec", "ValueError", 1): "model-spec-packaged",
        ("build_model", "ValueError", 1): "model-spec-tiny",
        ("build_model", "ValueError", 2): "model-spec-encoder-lm",
        ("build_model", "ValueError", 3): "model-spec-decoder-cls",
        ("build_model", "ValueError", 4): "model-spec-config-type",
        ("build_model", "ValueError", 5): "model-spec-config-type",
        ("build_model", "ValueError", 6): "model-tokenizer-size",
        ("refuse_missing_folder", "ValueError", 1): ("model-no-such-folder", "tokenizer-no-such-folder"),
        ("_load_or_packaged", "ValueError", 1): ("tokenizer-not-found", "model-not-found"),
    },
    "cli/report.py": {
        ("load_report", "FileNotFoundError", 1): "report-missing",
    },
    "clustering/__init__.py": {
        ("build_plan", "ValueError", 1): "clustering-group-divides",
        ("build_plan", "ValueError", 2): "clustering-too-few-weights",
        ("_refuse_sharded", "ValueError", 1): "fsdp2-clustering",
        ("check_clustering_record", "ValueError", 1): "load-clustering-record",
        ("check_clustering_record", "ValueError", 2): "load-clustering-record",
        ("check_clustering_record", "ValueError", 3): "load-clustering-layer",
        ("check_clustering_record", "ValueError", 4): "load-clustering-bits",
        ("check_clustering_record", "ValueError", 5): "load-clustering-parts",
    },
    "clustering/config.py": {
        ("ClusteringConfig.__post_init__.bad", "ValueError", 1): (
            "clustering-bits", "clustering-group-size", "clustering-start-step", "clustering-freeze-step",
            "clustering-refresh-interval", "clustering-init", "clustering-iters", "clustering-targets-regex"),
    },
    "clustering/kmeans.py": {
        ("pack", "ValueError", 1): R + "encode packs the inverse indices of torch.unique, always < 2^bits (encode refuses more values first).",
        ("unpack", "ValueError", 1): R + "decode checks the packed length before unpacking.",
    },
    "clustering/layers.py": {
        ("encode", "ValueError", 1): "clustering-changed-after-convert",
        ("decode", "ValueError", 1): R + "every load path checks the codebook shapes in the headers first (check_clustering_record).",
        ("decode", "ValueError", 2): R + "every load path checks the packed indices' length in the headers first (check_clustering_record).",
        ("_export_load_hook", "ValueError", 1): R + "a directory with one part only is refused before (the weight is missing for check_checkpoint).",
    },
    "distillation/cache.py": {
        ("cache_teacher_logits", "ValueError", 1): R + "`datasets` is a declared dependency (pragma: no cover).",
        ("cache_teacher_logits", "ValueError", 2): "cache-dataset-type",
        ("cache_teacher_logits", "ValueError", 3): "cache-k",
        ("cache_teacher_logits", "ValueError", 4): "cache-batch-size",
        ("cache_teacher_logits", "ValueError", 5): "cache-no-input-ids",
        ("cache_teacher_logits", "ValueError", 6): "cache-left-padding",
        ("cache_teacher_logits", "ValueError", 7): "cache-empty",
        ("has_cached_logits", "ValueError", 1): "cache-half",
        ("CachedLogitsCollator.__call__", "ValueError", 1): "cache-left-padding",
    },
    "distillation/config.py": {
        ("_count", "ValueError", 1): "kd-count",
        ("_count", "ValueError", 2): "kd-count",
        ("_count", "ValueError", 3): "kd-count",
        ("_number", "ValueError", 1): "kd-number-type",
        ("_number", "ValueError", 2): "kd-number-finite",
        ("_number", "ValueError", 3): "kd-temperature",
        ("_number", "ValueError", 4): "kd-alpha",
        ("DistillationConfig.__post_init__", "ValueError", 1): "kd-kd_loss",
        ("DistillationConfig.__post_init__", "ValueError", 2): "kd-hidden-loss",
        ("DistillationConfig.__post_init__", "ValueError", 3): "kd-unlabeled-type",
        ("DistillationConfig.__post_init__", "ValueError", 4): "kd-teacher-weights",
        ("DistillationConfig._parse_layer_map", "ValueError", 1): "kd-layer-map-json",
        ("DistillationConfig._parse_layer_map", "ValueError", 2): "kd-layer-map-type",
        ("DistillationConfig._parse_layer_map", "ValueError", 3): "kd-layer-map-entry",
        ("DistillationConfig._parse_layer_map", "ValueError", 4): "kd-layer-map-negative",
    },
    "distillation/layers.py": {
        ("resolve_layer_map", "ValueError", 1): "kd-layer-map",
    },
    "distillation/losses.py": {
        ("chunked_kd_loss", "ValueError", 1): R + "DistillationConfig refuses an unknown kd_loss first (kd-kd_loss); the function repeats it for direct callers.",
        ("chunked_kd_loss", "ValueError", 2): R + "the trainer passes exactly one of raw teacher logits and cached top-k log-probabilities.",
        ("chunked_kd_loss", "ValueError", 3): R + "the trainer passes one weight per teacher, checked before training (kd-teacher-weights-count).",
        ("teacher_log_probs", "ValueError", 1): R + "DistillationTrainer checks one weight per teacher before training (kd-teacher-weights-count).",
        ("divergence", "ValueError", 1): R + "DistillationConfig refuses an unknown kd_loss first (kd-kd_loss); guard for direct calls.",
        ("kd_loss", "ValueError", 1): R + "DistillationConfig refuses an unknown kd_loss first (kd-kd_loss); guard for direct calls.",
        ("hidden_loss", "ValueError", 1): R + "DistillationConfig refuses an unknown hidden_loss first (kd-hidden-loss); guard for direct calls.",
        ("attention_loss", "ValueError", 1): R + "the trainer checks equal head counts first (kd-attention-heads); both models see the same inputs.",
    },
    "distillation/sharing.py": {
        ("_groups", "ValueError", 1): "sharing-group-size",
        ("_groups", "ValueError", 2): "sharing-groups",
        ("shared_student_from_teacher", "ValueError", 1): "sharing-teacher-type",
        ("shared_student_from_teacher", "ValueError", 2): "sharing-compressed-teacher",
        ("shared_student_from_teacher", "ValueError", 3): "sharing-init",
        ("shared_student_from_teacher", "ValueError", 4): "sharing-init-index",
        ("check_sharing_record", "ValueError", 1): "load-sharing-record",
        ("check_sharing_record", "ValueError", 2): "load-sharing-blocks",
        ("check_sharing_record", "ValueError", 3): "load-sharing-groups",
    },
    "distillation/student.py": {
        ("_num_layers", "ValueError", 1): "student-no-layers",
        ("student_from_teacher", "ValueError", 1): "student-teacher-type",
        ("student_from_teacher", "ValueError", 2): "student-compressed-teacher",
        ("student_from_teacher", "ValueError", 3): "student-layers-empty",
        ("student_from_teacher", "ValueError", 4): "student-layers-range",
        ("student_from_teacher", "ValueError", 5): "student-layers-repeat",
        ("student_from_teacher", "ValueError", 6): R + "copying blocks of one model into a config of the same class always matches; a mismatch is a bug here.",
    },
    "distillation/teacher.py": {
        ("fsdp2_sharder", "ValueError", 1): R + "pyproject pins accelerate>=1.6,<2, which has fsdp2_prepare_model.",
        ("fsdp2_sharder", "ValueError", 2): R + "pyproject pins accelerate>=1.6,<2, whose fsdp2_prepare_model takes (accelerator, model).",
        ("prepare_teacher", "ValueError", 1): R + "DistillationTrainer refuses a teacher that is not a model first (kd-teacher-type).",
        ("load_teacher", "ValueError", 1): R + "the recipe refuses another teacher.low_bit at load (recipe-teacher-low-bit); the CLI is the caller.",
        ("to_low_bit", "ValueError", 1): R + "the recipe refuses another teacher.low_bit at load (recipe-teacher-low-bit); the CLI is the caller.",
        ("to_low_bit", "ValueError", 2): R + "bitsandbytes is a declared dependency (pragma: no cover).",
        ("to_low_bit", "ValueError", 3): R + "select_modules(field='low_bit') picks nn.Linear layers only.",
    },
    "integration.py": {
        ("_compressed_config_dispatch.CompressedConfig.from_dict", "ValueError", 1): "load-base-type",
        ("_Parked.forward", "RuntimeError", 1): R + "placeholder replaced before the model is returned (pragma: no cover).",
        ("_quantizer_classes.HfCompressQuantizer._process_model_before_weight_loading", "ValueError", 1): "load-pickle",
        ("_quantizer_classes.HfCompressQuantizer._process_model_after_weight_loading", "ValueError", 1): "load-weights-mismatch",
    },
    "loading.py": {
        ("_model_class", "ValueError", 1): "load-model-class",
        ("load_pretrained", "ValueError", 1): "load-weights-mismatch",
    },
    "lowrank/config.py": {  # lowrank
        ("_parse_ranks", "ValueError", 1): "lowrank-ranks-json",
        ("_parse_ranks", "ValueError", 2): "lowrank-ranks",
        ("LowRankConfig.__post_init__.bad", "ValueError", 1): (
            "lowrank-ranks", "lowrank-fraction", "lowrank-energy", "lowrank-fraction-and-energy", "lowrank-method",
            "lowrank-asvd-alpha", "lowrank-start-step", "lowrank-data-aware-at-0", "lowrank-schedule", "lowrank-frequency",
            "lowrank-end-step", "lowrank-targets-regex"),
        ("LowRankConfig.resolve_end", "ValueError", 1): "lowrank-start-after-run",
    },
    "lowrank/factorize.py": {  # lowrank
        ("LowRankLinear.__getattr__", "AttributeError", 1): "lowrank-qat-order",
    },
    "lowrank/lifecycle.py": {  # lowrank
        ("LowRank._check_rank_rules", "ValueError", 1): "lowrank-ranks-no-layer",
        ("LowRank._check_rank_rules", "ValueError", 2): "lowrank-rank-too-big",
        ("convert", "ValueError", 1): "lowrank-convert-data-aware",
    },
    "metrics.py": {
        ("evaluate_model", "ValueError", 1): R + "compression_report and the CLI check the task first (report-task, recipe-model-task).",
    },
    "modules.py": {
        ("_compile", "ValueError", 1): "prune-targets-regex",
        ("select_modules", "ValueError", 1): ("prune-no-target", "qat-no-target", "clustering-no-target", "lowrank-no-target",  # lowrank
                                              "sensitivity-no-target"),  # sensitivity
        ("find_blocks", "ValueError", 1): R + "reached only after family() / student_from_teacher matched a transformer; it has a block list.",
        ("model_class_for", "ValueError", 1): "load-architectures",
    },
    "onnx.py": {
        ("_InputQuantLinearOnnx.__init__", "ValueError", 1): "onnx-activation-quant",
        ("_InputQuantLinearOnnx.__init__", "ValueError", 2): R + "QATConfig accepts activation_bits=8 only, so every input-quantising layer is 8-bit.",
        ("_require_packages", "ValueError", 1): "onnx-packages",
        ("_check_metadata", "ValueError", 1): "onnx-bnb",
        ("check_exportable", "ValueError", 2): "onnx-bnb",
        ("check_exportable", "ValueError", 3): "onnx-activation-quant",
        ("_load", "FileNotFoundError", 1): "onnx-no-config",
        ("_output_name", "ValueError", 1): R + "check_exportable admits transformers models only, whose outputs carry logits or last_hidden_state.",
        ("check_exportable", "ValueError", 1): "onnx-not-a-model",
        ("export_onnx", "FileExistsError", 1): "onnx-exists",
        ("export_onnx", "NotADirectoryError", 1): "onnx-not-dir",
        ("export_onnx", "ValueError", 1): R + "a float model exported by torch.onnx runs the same ops in ONNX Runtime; a difference is a bug, checked here.",
        ("export_onnx", "raise", 1): R + "re-raises whatever stopped the export after removing its temporary folder.",
        ("_move_into_place", "raise", 1): R + "re-raises an OS error after putting the previous export back.",
        ("_check_options", "ValueError", 1): "onnx-int4-mode",  # onnx-int4
        ("_check_options", "ValueError", 2): "onnx-accuracy-level",  # onnx-int4
        ("_int4_layers", "ValueError", 1): "onnx-int4-activation-quant",  # onnx-int4
        ("_int4_layers", "ValueError", 2): "onnx-int4-group-size",  # onnx-int4
        ("int4_storage", "ValueError", 1): "onnx-int4-off-grid",  # onnx-int4
    },
    "pruning/config.py": {
        ("PruningConfig.__post_init__", "ValueError", 1): "prune-method",
        ("PruningConfig.__post_init__", "ValueError", 2): "prune-granularity",
        ("PruningConfig.__post_init__", "ValueError", 3): "prune-n-m",
        ("PruningConfig.__post_init__", "ValueError", 4): "prune-nm-sparsity",
        ("PruningConfig.__post_init__", "ValueError", 5): "prune-sparsity",
        ("PruningConfig.__post_init__", "ValueError", 6): "prune-scope",
        ("PruningConfig.__post_init__", "ValueError", 7): "prune-local-layers",
        ("PruningConfig.__post_init__", "ValueError", 8): "prune-schedule",
        ("PruningConfig.__post_init__", "ValueError", 9): "prune-step-int",
        ("PruningConfig.__post_init__", "ValueError", 10): "prune-steps",
        ("PruningConfig.__post_init__", "ValueError", 11): "prune-one-shot-grads",
        ("PruningConfig.__post_init__", "ValueError", 12): "prune-rewind",
        ("PruningConfig.__post_init__", "ValueError", 13): "prune-layers-keep",
        ("PruningConfig.__post_init__", "ValueError", 14): "prune-uniform-type",
        ("PruningConfig.__post_init__", "ValueError", 15): "prune-uniform-granularity",
        ("PruningConfig.resolve_end", "ValueError", 1): "prune-end-after-run",
        ("PruningConfig.resolve_end", "ValueError", 2): "prune-rewind-end",
        ("PruningConfig._check_layer_sparsity", "ValueError", 1): "prune-layer-sparsity-text",  # sensitivity
        ("PruningConfig._check_layer_sparsity", "ValueError", 2): "prune-layer-sparsity-type",  # sensitivity
        ("PruningConfig._check_layer_sparsity", "ValueError", 3): "prune-layer-sparsity-granularity",  # sensitivity
        ("PruningConfig._check_layer_sparsity", "ValueError", 4): "prune-layer-sparsity-target",  # sensitivity
        ("PruningConfig._check_layer_sparsity", "ValueError", 5): "prune-layer-sparsity-regex",  # sensitivity
        ("PruningConfig._check_layer_sparsity", "ValueError", 6): "prune-layer-sparsity-value",  # sensitivity
    },
    "pruning/lifecycle.py": {
        ("convert", "ValueError", 1): "fsdp2-remove-pruned",
        ("prepare", "ValueError", 1): "prune-layer-sparsity-no-layer",  # sensitivity
    },
    "pruning/lora.py": {
        ("merge_lora", "ValueError", 1): "merge-lora-not-peft",
        ("merge_lora", "RuntimeError", 1): R + "guards against a PEFT release that merges differently (version drift, not an input).",
    },
    "pruning/masks.py": {
        ("kth_smallest", "ValueError", 1): R + "callers pass 1 <= k <= n (k comes from the checked target_sparsity).",
        ("unstructured_masks", "ValueError", 1): R + "PruningConfig refuses another scope first (prune-scope).",
        ("nm_masks", "ValueError", 1): R + "Pruner refuses widths not divisible by m before training (dry-nm-divisible).",
    },
    "pruning/pruner.py": {
        ("check_plain", "ValueError", 1): "prune-converted",
        ("Pruner.__init__", "ValueError", 1): R + "PruningConfig refuses an unknown granularity first (prune-granularity).",
        ("Pruner.__init__", "ValueError", 2): "prune-structured-peft",
        ("Pruner.__init__", "ValueError", 3): "prune-incomplete-units",
        ("Pruner.__init__", "ValueError", 4): "dry-nm-divisible",
        ("Pruner.check_target", "ValueError", 1): "prune-local-too-many",
        ("Pruner.check_target", "ValueError", 2): "prune-too-many-units",
        ("Pruner.set_layer_sparsity", "ValueError", 1): R + "prepare passes one entry per targeted module, and PruningConfig refuses layer_sparsity with other granularities (prune-layer-sparsity-granularity).",  # sensitivity
        ("Pruner.load_state_dict", "ValueError", 1): R + "check_state_tensors refuses a state missing tensors first (resume-state-damaged).",
    },
    "pruning/schedules.py": {
        ("sparsity_at", "ValueError", 1): R + "PruningConfig refuses an unknown schedule first (prune-schedule).",
    },
    "pruning/scores.py": {
        ("init_scores", "ValueError", 1): R + "PruningConfig refuses an unknown method first (prune-method).",
        ("init_scores", "ValueError", 2): "prune-frozen",
        ("accumulate", "ValueError", 1): R + "called only for the gradient methods (movement, taylor).",
    },
    "pruning/structured/__init__.py": {
        ("family", "ValueError", 1): "prune-architecture",
        ("apply_structure", "ValueError", 1): R + "storage.check_pruning_record refuses a record that does not fit the architecture first (load-edited-structure).",
        ("apply_structure", "ValueError", 2): R + "storage.check_pruning_record refuses a record that does not fit the architecture first (load-edited-structure).",
        ("check_uniform", "ValueError", 1): "prune-uniform-partial",
        ("check_uniform", "ValueError", 2): "prune-uniform-uneven",
        ("check_uniform", "ValueError", 3): "prune-uniform-unexpressible",
        ("check_uniform", "ValueError", 4): R + "family() matches transformers architectures only, which are PreTrainedModels.",
        ("check_uniform", "ValueError", 5): "prune-uniform-unexpressible",
    },
    "pruning/structured/common.py": {
        ("unit_groups", "ValueError", 1): R + "callers pass 'heads', 'neurons' or 'layers' (PruningConfig checked granularity).",
        ("check_units", "ValueError", 1): R + "unit indices come from the pruner's masks, within range (tests/test_pruning_structured.py calls it directly).",
        ("check_units", "ValueError", 2): R + "check_target keeps at least one unit per layer before training (prune-too-many-units, prune-local-too-many).",
        ("shrink", "ValueError", 1): "prune-converted",
    },
    "pruning/structured/gpt2.py": {
        ("remove_layers", "ValueError", 1): "prune-gpt2-layers-scaled",
    },
    "quantization/__init__.py": {
        ("convert", "ValueError", 1): "qat-convert-no-config",
        ("convert", "ValueError", 2): "fsdp2-qat",
        ("rebuild_quantized", "ValueError", 1): "load-quant-metadata",
        ("rebuild_quantized", "ValueError", 2): "load-quant-metadata",
        ("rebuild_quantized", "ValueError", 3): "load-quant-metadata",
    },
    "quantization/backends/__init__.py": {
        ("Backend.convert", "NotImplementedError", 1): R + "abstract method; every backend overrides it.",
        ("Backend.empty", "NotImplementedError", 1): R + "abstract method; every backend overrides it.",
        ("Backend.require", "ValueError", 1): "qat-export-unavailable",
        ("get_backend", "ValueError", 1): "load-quant-metadata",
    },
    "quantization/backends/bnb.py": {
        ("Bnb.check", "ValueError", 1): "qat-export-nf4-backend",
        ("Bnb.check", "ValueError", 2): "qat-export-weight-range-bnb",
        ("Bnb.check", "ValueError", 3): "qat-export-scheme-bnb",
    },
    "quantization/backends/torch_int8.py": {
        ("TorchInt8.check", "ValueError", 1): "qat-export-scheme",
    },
    "quantization/config.py": {
        ("_parse_layer_bits", "ValueError", 1): "qat-layer-bits-json",
        ("_parse_layer_bits", "ValueError", 2): "qat-layer-bits-format",
        ("QATConfig.__post_init__.bad", "ValueError", 1): (
            "qat-export", "qat-bits", "qat-activation-bits", "qat-weight-format", "qat-layer-bits-regex", "qat-layer-bits-bits",
            "qat-group-size", "qat-group-size-8bit", "qat-nf4-bits", "qat-nf4-group-size", "qat-nf4-symmetric", "qat-observer",
            "qat-percentile", "qat-averaging", "qat-start-step", "qat-freeze-step", "qat-targets-regex", "qat-export-unavailable",
            "qat-weight-range", "qat-embedding-bits"),
        ("QATConfig.__post_init__", "ValueError", 1): ("qat-export-scheme", "qat-export-scheme-bnb", "qat-export-nf4-backend",
                                                       "qat-export-weight-range-bnb"),
    },
    "quantization/embedding.py": {
        ("embedding_target", "ValueError", 1): "qat-embedding-tied",
        ("embedding_target", "ValueError", 2): "qat-embedding-shared",
        ("check_embedding_record.bad", "ValueError", 1): "load-bad-metadata",
    },
    "quantization/fake_quant.py": {
        ("insert_fake_quant", "ValueError", 1): R + "the plan is built from the same model's modules (build_plan / QATCallback).",
    },
    "quantization/numerics.py": {
        ("QScheme.__post_init__", "ValueError", 1): R + "QATConfig refuses another weight_format first (qat-weight-format).",
        ("QScheme.__post_init__", "ValueError", 2): R + "QATConfig refuses an unknown weight_range first (qat-weight-range).",
        ("QScheme.__post_init__", "ValueError", 3): R + "QATConfig refuses unsupported bits first (qat-bits, qat-layer-bits-bits).",
        ("QScheme.__post_init__", "ValueError", 4): R + "QATConfig refuses a bad group_size first (qat-group-size).",
        ("QScheme.__post_init__", "ValueError", 5): R + "QATConfig refuses NF4 with other bits / groups / asymmetry first (qat-nf4-*).",
        ("int_range", "ValueError", 1): R + "QATConfig / QScheme refuse an unknown weight_range first (qat-weight-range); guard for direct calls.",
        ("QScheme.check_width", "ValueError", 1): "dry-group-size",
        ("fake_quantize", "ValueError", 1): R + "activation quantisers always pass one scale; weights use fake_quantize_weight.",
    },
    "quantization/observers.py": {
        ("Observer.__init__", "ValueError", 1): R + "QATConfig refuses an unknown observer first (qat-observer).",
        ("Observer.__init__", "ValueError", 2): R + "QATConfig refuses averaging outside (0, 1] first (qat-averaging).",
        ("Observer.__init__", "ValueError", 3): R + "QATConfig refuses percentile outside (50, 100] first (qat-percentile).",
    },
    "quantization/plan.py": {
        ("build_plan", "ValueError", 1): "qat-already-converted",
        ("build_plan", "raise", 1): ("qat-no-target",),  # select_modules' own refusal, passed on
    },
    "quantization/ptq.py": {
        ("_run", "ValueError", 1): "ptq-calib-batch-type",
        ("quantize_model", "ValueError", 1): "ptq-no-calib",
        ("quantize_model", "ValueError", 2): "ptq-num-batches",
        ("quantize_model", "ValueError", 3): "ptq-calib-empty",
    },
    "report.py": {
        ("ReportConfig.__post_init__", "ValueError", 1): "report-batch-sizes",
        ("ReportConfig.__post_init__", "ValueError", 2): "report-positive",
        ("ReportConfig.__post_init__", "ValueError", 3): "report-warmup",
        ("compression_report", "ValueError", 1): "report-no-models",
        ("compression_report", "ValueError", 2): "report-task",
    },
    "sensitivity/analysis.py": {  # sensitivity
        ("parse_setting", "ValueError", 1): R + "settings come from settings_for(SensitivityConfig), which writes only prune: / bits: / rank:.",
        ("_as_scores", "ValueError", 1): "sensitivity-eval-fn-dict",
        ("analyze_sensitivity", "ValueError", 1): "sensitivity-eval-source",
    },
    "sensitivity/budget.py": {  # sensitivity
        ("option_cost", "ValueError", 1): R + "plan_budget measures the latencies (or refuses, budget-latency-model) before any cost is read.",
        ("plan_budget", "ValueError", 1): "budget-axes-not-analysed",
        ("plan_budget", "ValueError", 2): "budget-latency-model",
        ("plan_budget", "ValueError", 3): "budget-unreachable",
        ("fragment_configs", "ValueError", 1): "fragment-sections",
    },
    "sensitivity/config.py": {  # sensitivity
        ("SensitivityConfig.__post_init__.bad", "ValueError", 1): ("sensitivity-axes", "sensitivity-sparsities", "sensitivity-bits",
                                                                    "sensitivity-rank-fractions", "sensitivity-targets-regex", "sensitivity-samples"),
        ("BudgetConfig.__post_init__.bad", "ValueError", 1): ("budget-metric", "budget-one-of", "budget-fraction", "budget-value",
                                                               "budget-axes", "budget-resolution"),
    },
    "storage.py": {
        ("compress", "ValueError", 1): R + "the save hook and _candidates pass 2-D weights only.",
        ("decompress", "ValueError", 1): "load-sparse-parts",
        ("decompress", "ValueError", 2): "load-sparse-parts",
        ("decompress", "ValueError", 3): "load-sparse-parts",
        ("decompress", "ValueError", 4): "load-sparse-parts",
        ("_load_hook", "ValueError", 1): "load-sparse-parts",
        ("set_storage", "ValueError", 1): "storage-mode",
        ("safe_file", "ValueError", 1): "load-path-escape",
        ("safe_file", "FileNotFoundError", 1): "load-path-escape",
        ("safe_file", "ValueError", 2): "load-path-escape",
        ("safe_file", "ValueError", 3): "load-path-escape",
        ("safe_file", "ValueError", 4): "load-path-escape",
        ("weight_files", "ValueError", 1): "load-bad-index",
        ("weight_files", "ValueError", 2): "load-bad-index",
        ("weight_files", "ValueError", 3): "load-bad-index",
        ("weight_files", "FileNotFoundError", 1): "load-pickle",
        ("read_header", "ValueError", 1): "load-bad-safetensors",
        ("read_header", "ValueError", 2): "load-bad-safetensors",
        ("read_header", "ValueError", 3): "load-bad-safetensors",
        ("read_header", "ValueError", 4): R + "caught on the next lines and re-raised as 'the safetensors header is not valid JSON' (load-bad-safetensors).",
        ("read_header", "ValueError", 5): "load-bad-safetensors",
        ("read_header", "ValueError", 6): "load-bad-safetensors",
        ("read_header", "ValueError", 7): "load-bad-safetensors",
        ("read_headers", "ValueError", 1): "load-bad-safetensors",
        ("check_raw_config", "ValueError", 1): "load-bad-config",
        ("check_raw_config", "ValueError", 2): "load-bad-config",
        ("check_raw_config", "ValueError", 3): "load-bad-config",
        ("check_raw_config", "ValueError", 4): "load-bad-config",
        ("check_raw_config", "ValueError", 5): "load-bad-config",
        ("check_raw_config", "ValueError", 6): "load-bad-config",
        ("check_pruning_record", "ValueError", 1): "load-bad-metadata",
        ("check_pruning_record", "ValueError", 2): "load-bad-metadata",
        ("check_pruning_record", "ValueError", 3): "load-bad-metadata",
        ("check_pruning_record", "ValueError", 4): "load-edited-structure",
        ("check_metadata", "ValueError", 1): "load-bad-metadata",
        ("check_metadata", "ValueError", 2): "load-bad-metadata",
        ("check_metadata", "ValueError", 3): "load-bad-metadata",
        ("check_metadata", "ValueError", 4): "load-bad-metadata",
        ("check_metadata", "ValueError", 5): "load-bad-metadata",
        ("check_metadata", "ValueError", 6): "load-bad-metadata",
        ("check_metadata", "ValueError", 7): "load-bad-metadata",
        ("check_metadata", "ValueError", 8): "load-bad-metadata",
        ("check_lowrank_record.bad", "ValueError", 1): "load-lowrank-record",  # lowrank
        ("check_checkpoint", "ValueError", 1): "load-weights-mismatch",
        ("check_checkpoint", "ValueError", 2): "load-bad-config",
    },
    "trainers/distillation_trainer.py": {
        ("DistillationTrainer.__init__", "ValueError", 1): "kd-config-type",
        ("DistillationTrainer._validate", "ValueError", 1): "kd-no-teacher",
        ("DistillationTrainer._validate", "ValueError", 2): "kd-cached-intermediate",
        ("DistillationTrainer._validate", "ValueError", 3): "kd-multi-teacher-intermediate",
        ("DistillationTrainer._validate", "ValueError", 4): "kd-teacher-weights-count",
        ("DistillationTrainer._validate", "ValueError", 5): "kd-teacher-type",
        ("DistillationTrainer._validate", "ValueError", 6): "kd-self-teacher",
        ("DistillationTrainer._validate", "ValueError", 7): "kd-frozen-student",
        ("DistillationTrainer._validate", "ValueError", 8): "kd-multi-label",
        ("DistillationTrainer._validate", "ValueError", 9): "kd-no-head",
        ("DistillationTrainer._validate", "ValueError", 10): "kd-one-label",
        ("DistillationTrainer._validate", "ValueError", 11): ("kd-labels", "kd-vocab"),
        ("DistillationTrainer._validate", "ValueError", 12): "kd-tokenizer-vocab",
        ("DistillationTrainer._validate", "ValueError", 13): "kd-hidden-width",
        ("DistillationTrainer._validate", "ValueError", 14): "kd-attention-heads",
        ("DistillationTrainer._validate_cache", "ValueError", 1): "kd-cache-shape",
        ("DistillationTrainer._validate_cache", "ValueError", 2): "kd-cache-classes",
        ("DistillationTrainer._validate_unlabeled", "ValueError", 1): "kd-unlabeled-task",
        ("DistillationTrainer._validate_unlabeled", "ValueError", 2): "kd-unlabeled-alpha",
        ("DistillationTrainer._validate_unlabeled", "ValueError", 3): "kd-unlabeled-custom-loss",
        ("DistillationTrainer.create_optimizer", "ValueError", 1): "kd-optimizer-projections",
        ("DistillationTrainer._hard_loss", "ValueError", 1): R + "a model with a task head returns a loss when given labels; a headless one is refused before training (kd-no-head).",
        ("DistillationTrainer._attention_loss", "ValueError", 1): R + "the trainer switches student and teacher to eager attention, which returns the maps.",
        ("DistillationTrainer._raise_non_finite", "FloatingPointError", 1): "kd-nan",
    },
}
