"""`nnsam_check -d`: list what the trainers would refuse or what a run left behind, and the command that fixes it.

Looks at one configuration's preprocessed unlabelled cases and every pseudo-label set (plans identifier, fold) beside
it; writes nothing. Each finding names the case or file, what is wrong, and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from batchgenerators.utilities.file_and_folder_operations import load_json, load_pickle

from nnunet_sam.nnunet.datasets import DatasetFolders, pseudo_label_root, pseudo_label_sets
from nnunet_sam.nnunet.preprocessed_cases import finished_cases
from nnunet_sam.nnunet.pseudolabels import pseudo_label_source
from nnunet_sam.nnunet.provenance import SOURCE_KEY, file_fingerprint, preprocessing_hash, same_source, why_stale
from nnunet_sam.nnunet.report import REPORT_NAME, case_report_path
from nnunet_sam.nnunet.sam_views import ViewVolumes, views_folder
from nnunet_sam.nnunet.unlabeled import UnlabeledCase, find_unlabeled_cases
from nnunet_sam.utils.atomic import TEMP_PREFIX, finished_files


@dataclass(frozen=True)
class Finding:
    """One problem: where (a folder), which case or file, what is wrong, and the command that fixes it."""

    where: Path
    item: str
    problem: str
    fix: str


def check_dataset(folders: DatasetFolders) -> list[Finding]:
    """Every finding for the unlabelled cases and pseudo labels of `folders`' configuration."""
    cases = find_unlabeled_cases(folders)
    findings = _check_unlabeled(folders, cases)
    legacy = pseudo_label_root(folders.data_folder)
    for case_id in finished_cases(legacy):
        findings.append(Finding(legacy, case_id, "pseudo label in the layout before per-plans, per-fold sets: no "
                                "trainer reads it", f"delete it; make new ones with {_refine(folders, '<FOLD>')}"))
    for labels in pseudo_label_sets(folders.data_folder):
        findings += _check_pseudo_label_set(folders, labels, cases)
    return findings


def _preprocess(folders: DatasetFolders) -> str:
    return f"nnsam_preprocess_unlabeled -d {folders.name} -c {folders.configuration} -p {folders.plans_identifier}"


def _refine(folders: DatasetFolders, fold: str, plans: str | None = None, trainer: str | None = None) -> str:
    command = f"nnsam_refine -d {folders.name} -c {folders.configuration} -p {plans or folders.plans_identifier}"
    return command + f" -f {fold}" + (f" -tr {trainer}" if trainer else "")


def _leftovers(folder: Path) -> list[Finding]:
    """Temporary files of killed runs, and cases without their .pkl (written last): neither is ever read."""
    if not folder.is_dir():
        return []
    findings = [Finding(folder, p.name, "temporary file of an unfinished write (a killed or running process)",
                        "removed by the next run of the command that writes here")
                for p in sorted(folder.rglob(TEMP_PREFIX + "*"))]
    parts = {p.name.removesuffix(".b2nd").removesuffix("_seg") for p in finished_files(folder, "*.b2nd")}
    for case_id in sorted(parts - set(finished_cases(folder))):
        findings.append(Finding(folder, case_id, "case without its .pkl (half-written or half-removed): never read",
                                "rerun the command that writes here; it redoes the case"))
    return findings


def _check_unlabeled(folders: DatasetFolders, cases: list[UnlabeledCase]) -> list[Finding]:
    folder = folders.unlabeled_data
    findings = _leftovers(folder)
    finished = set(finished_cases(folder))
    expected = preprocessing_hash(folders.plans(), folders.configuration)
    for case in cases:
        if case.case_id not in finished:
            findings.append(Finding(folder, case.case_id, "not preprocessed", _preprocess(folders)))
            continue
        reason = why_stale(load_pickle(str(folder / f"{case.case_id}.pkl")).get(SOURCE_KEY), case.images, expected)
        if reason is not None:
            findings.append(Finding(folder, case.case_id, f"stale: {reason}", _preprocess(folders)))
    for case_id in sorted(finished - {c.case_id for c in cases}):
        findings.append(Finding(folder, case_id, f"no longer in {folders.unlabeled_images}",
                                f"{_refine(folders, '<FOLD>')} removes it"))
    return findings + _check_views(folders, cases)


def _check_views(folders: DatasetFolders, cases: list[UnlabeledCase]) -> list[Finding]:
    """The cached SAM view volumes that no longer fit their images or plans, or cannot be read (never used:
    the next refinement makes them again)."""
    if not views_folder(folders).is_dir():
        return []
    views = ViewVolumes(folders)
    findings = _leftovers(views.folder)
    for case in cases:
        reason = views.stale(case.case_id, case.images)
        if reason is not None:
            findings.append(Finding(views.folder, f"{case.case_id}.npz", f"stale SAM view: {reason}",
                                    f"{_refine(folders, '<FOLD>')} makes it again"))
    return findings


def _check_pseudo_label_set(folders: DatasetFolders, labels: Path, cases: list[UnlabeledCase]) -> list[Finding]:
    fold, plans = labels.name.removeprefix("fold_"), labels.parent.name
    report_file = labels / REPORT_NAME
    model = load_json(str(report_file)).get("initial_model") if report_file.is_file() else None
    fix = _refine(folders, fold, plans, model["trainer"] if model else None)
    findings = _leftovers(labels)
    if not report_file.is_file():
        findings.append(Finding(labels, REPORT_NAME, "missing: the set does not say which model made it", fix))
    elif model is not None:
        findings += _check_model(labels, fold, model, fix)
    images = folders.unlabeled_data
    current = {c.case_id for c in cases}
    for case_id in finished_cases(labels):
        if case_id not in current or not (images / f"{case_id}.pkl").is_file():
            findings.append(Finding(labels, case_id, "no preprocessed image of an unlabelled case",
                                    f"{fix} removes it"))
        elif not same_source(pseudo_label_source(labels, case_id), pseudo_label_source(images, case_id)):
            findings.append(Finding(labels, case_id, "stale: made from an earlier preprocessing of its image",
                                    f"{fix} --continue"))
    done = set(finished_cases(labels)) | {c for c in current if case_report_path(labels, c).is_file()}
    for case_id in sorted(current - done):
        findings.append(Finding(labels, case_id, "no pseudo label yet", f"{fix} --continue"))
    return findings


def _check_model(labels: Path, fold: str, model: dict, fix: str) -> list[Finding]:
    """The set's initial model: made for this fold (no leakage), and not trained again since."""
    findings = []
    folds = [str(f) for f in model.get("folds", [])]
    if fold != "all" and folds != [fold]:
        findings.append(Finding(labels, REPORT_NAME, f"made by fold(s) {', '.join(folds)}, which saw fold {fold}'s "
                                f"validation cases: the trainers refuse it (leakage)", fix))
    for model_fold, recorded in (model.get("checkpoint_files") or {}).items():
        path = Path(model["folder"]) / f"fold_{model_fold}" / model["checkpoint"]
        if not path.is_file():
            findings.append(Finding(labels, REPORT_NAME, f"the model that made it ({path}) no longer exists", fix))
        elif file_fingerprint(path, content=False) != recorded:
            findings.append(Finding(labels, REPORT_NAME, f"the model that made it ({path}) was trained again since",
                                    fix))
    return findings


def findings_table(findings: list[Finding]) -> str:
    """The findings as a Markdown table (folder, item, problem, fix)."""
    rows = ["| folder | case / file | problem | fix |", "| --- | --- | --- | --- |"]
    rows += [f"| {f.where} | {f.item} | {f.problem} | `{f.fix}` |" for f in findings]
    return "\n".join(rows)
