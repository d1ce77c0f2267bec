"""The phases of a training run (Huang et al. 2021, Section 3.2), each given the run's
`Run`:

- phase 1, `segmentation_phase`: the segmenter with the hybrid loss on "coarse" and
  "final" (and the classifier head with ``train.classifier_aux_weight``);
- phase 1b, `self_training_phase`: students on labelled and pseudo-labelled slices,
  round after round (`tfcovseg.configs.experiment.SemiConfig`);
- phase 2, `classification_phase`: the pooling + dense head on the best segmenter's frozen
  encoder (the paper's gate), on slices or on their pooled features.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np

from data_tools.files import atomic_write_json
from tfcovseg.data.dataset import OTHER_PNEUMONIA, classify_label, make_dataset, slice_is_usable
from tfcovseg.evaluation.metrics import SliceAUC
from tfcovseg.models import (
    build_classifier,
    build_model,
    load_model,
    model_file_problem,
    save_model,
)
from tfcovseg.models.classifier import head_on_features, head_options, with_classifier_head
from tfcovseg.training.callbacks import OverlayImages, PatientEvaluation, remove_backup
from tfcovseg.training.distributed import is_chief, is_multi_worker
from tfcovseg.training.errors import TrainingError
from tfcovseg.training.fitting import (
    Run,
    finish_best,
    fit,
    intensity_window,
    phase_callbacks,
    segment_train_ds,
    steps_per_epoch,
    validation_ds,
)
from tfcovseg.training.inputs import classifier_records
from tfcovseg.training.recipe import (
    build_segmenter,
    compile_segmenter,
    keras_verbose,
    segmentation_objective,
)
from tfcovseg.training.selftrain import collect_images, mixed_dataset, pseudo_dataset
from tfcovseg.training.semisup import label_round


def _build_classifier(segmenter, model):
    """The classifier head the model config asks for, on the segmenter's encoder."""
    return build_classifier(segmenter, **head_options(model))


def _overlay_slices(dataset, k: int):
    """Up to k slices with lesions (HU [k,H,W,1], masks [k,H,W,C]) from a dataset."""
    images, masks = [], []
    for batch in dataset:
        for i in range(int(batch["hu"].shape[0])):
            if batch["slice/label"][i] > 0 and len(images) < k:
                images.append(batch["hu"][i].numpy()[..., None])
                masks.append(batch["lesions"][i].numpy())
        if len(images) >= k:
            break
    return images, masks


def segmentation_phase(run: Run):
    """Phase 1: the segmenter with the hybrid loss (and the classifier head, with
    ``train.classifier_aux_weight``); returns the segmenter."""
    config, t, out = run.config, run.config.train, run.out
    with run.strategy.scope():
        segmenter = build_model(config.model)
        outputs = tuple(segmenter.output)
        losses, weights, metrics = segmentation_objective(config, outputs)
        fit_model, label_output = segmenter, None
        if t.classifier_aux_weight:
            # Segmentation and the slice classifier's head train the encoder together.
            head = _build_classifier(segmenter, config.model)
            fit_model = with_classifier_head(segmenter, head)
            label_output = "covid_probability"
            losses[label_output] = "binary_crossentropy"
            weights[label_output] = t.classifier_aux_weight
            metrics[label_output] = [SliceAUC(name="auc")]
    train_ds = segment_train_ds(run, outputs, label_output)
    with run.strategy.scope():
        compile_segmenter(config, fit_model, (losses, weights, metrics), steps_per_epoch(train_ds))
    val_ds = validation_ds(run, outputs, label_output)
    extra = []
    if t.overlay_images and is_chief(run.strategy):
        images, masks = _overlay_slices(run.inspect_val, t.overlay_images)
        if images:
            extra.append(
                OverlayImages(
                    images,
                    masks,
                    out / "logs" / "tensorboard" / "segmentation",
                    window=config.model.hu_window,
                    class_names=config.model.class_names,
                )
            )
    run.log(
        f"phase 1: segmentation, {config.model.architecture} at "
        f"{config.model.input_size[0]}x{config.model.input_size[1]}, fold {config.data.fold}, "
        f"up to {t.epochs} epochs"
    )
    callbacks = phase_callbacks(
        out, "segmentation", t.early_stopping_patience, run.resume, extra, segmenter, run.log,
        inputs=train_ds,
    )  # fmt: skip
    fit(fit_model, run.strategy, train_ds, val_ds, t.epochs, callbacks, run.verbose, run.log)
    save_model(segmenter, out / "segmenter_last.keras")
    finish_best(segmenter, out, "segmentation", run.log)
    return segmenter


def _unlabelled_images(run: Run) -> np.ndarray:
    """The unlabelled slices self-training labels: ``semi.records_dir``'s (all), else
    those of the training split of ``data.records_dir``."""
    semi = run.config.semi
    common = dict(run.common)
    split = run.config.data.train_split
    if semi.records_dir:
        common["record_dir"] = Path(semi.records_dir).expanduser()
        split = "all"
    ds = make_dataset(split=split, training=False, task="unlabelled", **common)
    return collect_images(ds)


def _first_teacher(run: Run, segmenter):
    """Phase 1's best segmenter, kept as ``teacher_best.keras`` (``segmenter_best.keras``
    becomes the student's when the phase ends)."""
    out = run.out
    teacher = out / "teacher_best.keras"
    if segmenter is not None or model_file_problem(teacher):
        # Phase 1 ran in this process, or it never handed over: its best is the teacher.
        save_model(load_model(out / "segmenter_best.keras"), teacher)
    return load_model(teacher)


def _labelled_reference(run: Run):
    """The labelled training slices the unlabelled ones are intensity-matched to, or None
    (HU records need no matching)."""
    config = run.config
    if not (config.model.pre_windowed and config.semi.match_intensity):
        return None
    split = config.data.train_split
    return collect_images(make_dataset(split=split, training=False, task="segment", **run.common))


def _rounds_done(run: Run, fresh_teacher: bool, state: dict) -> dict:
    """The rounds a resumed run completed before ({round: record}); none when phase 1 ran
    in this process (its teacher is new, so are the rounds), whose old files go."""
    if fresh_teacher or not run.resume:  # an interrupted round's backup is kept otherwise
        for r in range(1, run.config.semi.rounds + 1):
            shutil.rmtree(run.out / "backup" / f"student_r{r}", ignore_errors=True)
            (run.out / "logs" / f"student_r{r}.csv").unlink(missing_ok=True)
        return {}
    return {r["round"]: r for r in state.get("self_training", [])}


def _student_round(run: Run, r: int, teacher, labels, n_pseudo: int):
    """One round's student: from the teacher's weights, on labelled batches with
    `n_pseudo` pseudo-labelled slices in each; returns its best model and the round's
    record."""
    config, t, out, tag = run.config, run.config.train, run.out, f"student_r{r}"
    outputs = tuple(teacher.output)
    labelled = segment_train_ds(run, outputs, batch_size=t.batch_size - n_pseudo)
    with run.strategy.scope():
        student = build_segmenter(
            config.for_student(), teacher, steps_per_epoch(labelled), config.semi.epochs
        )
    window = intensity_window(config)
    pseudo = pseudo_dataset(
        labels, n_pseudo, t.seed + r, config.data.augment, window, config.data.spatial_augment
    )
    mixed = mixed_dataset(labelled, pseudo, outputs)
    callbacks = phase_callbacks(
        out, "self_training", t.early_stopping_patience, run.resume, log=run.log, tag=tag,
        inputs=mixed,
    )  # fmt: skip
    history = fit(
        student, run.strategy, mixed, validation_ds(run, outputs), config.semi.epochs,
        callbacks, run.verbose, run.log,
    )  # fmt: skip
    best = out / f"{tag}_best.keras"
    if model_file_problem(best):
        save_model(student, best)
    record = {
        "round": r,
        "pool": labels.pool,
        "pseudo_labelled": len(labels.images),
        "confidence_min": round(labels.confidence_min, 4),
        "epochs": len(getattr(history, "history", {}).get("loss", [])),
    }
    return load_model(best), record


def self_training_phase(run: Run, segmenter, state: dict):
    """Phase 1b: self-training (`tfcovseg.configs.experiment.SemiConfig`); returns the
    student, which is also saved as ``segmenter_best.keras`` for the phases and tools after it."""
    t, semi, out = run.config.train, run.config.semi, run.out
    teacher = _first_teacher(run, segmenter)
    unlabelled = _unlabelled_images(run)
    reference = _labelled_reference(run)
    n_pseudo = max(1, int(round(semi.share * t.batch_size)))
    rng = np.random.default_rng(t.seed)
    # Phase 1 ran in this process: the teacher is new, earlier rounds are stale.
    done = _rounds_done(run, segmenter is not None, state)
    rounds = []
    run.log(
        f"phase 1b: self-training on {len(unlabelled)} unlabelled slices, {semi.rounds} "
        f"round(s) of up to {semi.epochs} epochs, {n_pseudo} of every {t.batch_size} "
        "slices pseudo-labelled"
    )
    for r in range(1, semi.rounds + 1):
        pool = np.sort(rng.permutation(len(unlabelled))[: semi.pool or len(unlabelled)])
        best = out / f"student_r{r}_best.keras"
        if r in done and model_file_problem(best) is None:
            run.log(f"  round {r}: completed before")
            teacher = load_model(best)
            rounds.append(done[r])
            continue
        labels = label_round(
            teacher, unlabelled[pool], semi.views, semi.keep, reference,
            t.positive_weights,
        )  # fmt: skip
        run.log(
            f"  round {r}: {len(labels.images)} of {labels.pool} slices pseudo-labelled "
            f"(confidence >= {labels.confidence_min:.3f})"
        )
        teacher, record = _student_round(run, r, teacher, labels, n_pseudo)
        rounds.append(record)
        state["self_training"] = rounds
        atomic_write_json(out / "state.json", state)
        remove_backup(out, f"student_r{r}")
    save_model(teacher, out / "student_best.keras")
    save_model(teacher, out / "segmenter_best.keras")  # what phase 2, evaluate and export use
    return teacher


def classification_phase(run: Run, segmenter) -> None:
    """Phase 2: the classifier head on the best segmenter's frozen encoder (the paper's
    gate), or the plain SE-ResNet classifier; on the classifier's own phantom cohort when
    one is configured (`data.classifier_phantom_patients`)."""
    config, out = run.config, run.out
    classifier = _phase_two_classifier(run, segmenter)
    cohort = classifier_records(config, run.log)
    # Patient-level metrics predict slice by slice on one worker: not under multi-worker.
    multi = is_multi_worker(run.strategy)
    patient_eval = [] if multi else [PatientEvaluation(run.inspect_val, classifier=classifier)]
    frozen = config.model.architecture != "seresnet_classifier"
    if cohort is not None and frozen and not multi and classifier.head == "dense":
        _fit_head_on_features(run, classifier, cohort, patient_eval)
    else:
        _fit_classifier(run, classifier, cohort, patient_eval)
    save_model(classifier, out / "classifier_last.keras")
    finish_best(classifier, out, "classification", run.log)


def _phase_two_classifier(run: Run, segmenter):
    config, t, out = run.config, run.config.train, run.out
    with run.strategy.scope():
        if config.model.architecture == "seresnet_classifier":
            classifier = build_model(config.model)
        else:
            # The encoder of the best segmenter (the checkpoint, which also holds after
            # a resumed run), frozen: the paper's phase 2.
            best = out / "segmenter_best.keras"
            if best.is_file():
                segmenter = load_model(best)
            elif segmenter is None:
                raise TrainingError(
                    f"classification without segmentation needs {best} from an "
                    f"earlier segmentation phase"
                )
            classifier = _build_classifier(segmenter, config.model)
            classifier.encoder.trainable = False
        classifier.compile(
            optimizer=keras.optimizers.Adam(t.classifier_learning_rate),
            loss="binary_crossentropy",
            metrics=[
                keras.metrics.BinaryAccuracy(name="accuracy"),
                SliceAUC(name="auc"),
            ],
            jit_compile=t.jit_compile,
        )
    return classifier


def _fit_classifier(run: Run, classifier, cohort, patient_eval) -> None:
    """Phase 2 on batches of slices (augmented, through the frozen encoder each step)."""
    config, t = run.config, run.config.train
    train_common = {**run.common, "record_dir": cohort} if cohort else run.common
    train_ds = make_dataset(
        split="all" if cohort else config.data.train_split,
        training=True,
        compact=True,  # int16/uint8 batches: the model casts
        task="classify",
        augment_data=config.data.augment,
        oversample_pneumonia=config.data.oversample_pneumonia,
        shuffle_buffer=config.data.shuffle_buffer,
        intensity_window=intensity_window(config),
        spatial_augment=config.data.spatial_augment,
        **train_common,
    )
    val_ds = make_dataset(
        split="validation",
        training=False,
        compact=True,  # int16/uint8 batches: the model casts
        task="classify",
        drop_remainder=run.eval_drop,
        **run.common,
    )
    run.log(
        f"phase 2: classification head on the frozen encoder, up to {t.classifier_epochs} epochs"
    )
    callbacks = phase_callbacks(
        run.out, "classification", t.early_stopping_patience, run.resume, patient_eval,
        log=run.log, inputs=train_ds,
    )  # fmt: skip
    fit(
        classifier,
        run.strategy,
        train_ds,
        val_ds,
        t.classifier_epochs,
        callbacks,
        run.verbose,
        run.log,
    )


def _fit_head_on_features(run: Run, classifier, cohort: Path, patient_eval) -> None:
    """Phase 2 on the frozen encoder's pooled features, computed once per slice."""
    t = run.config.train
    features, head = head_on_features(classifier)
    head.compile(
        optimizer=keras.optimizers.Adam(t.classifier_learning_rate),
        loss="binary_crossentropy",
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), SliceAUC(name="auc")],
    )
    every = make_dataset(
        split="all", training=False, task="inspect", **{**run.common, "record_dir": cohort}
    )
    x, y, w = pooled_features(features, every, run.config.data.oversample_pneumonia)
    val = make_dataset(split="validation", training=False, task="inspect", **run.common)
    xv, yv, _ = pooled_features(features, val, 1)
    run.log(
        f"phase 2: classification head on the frozen encoder's pooled features of {len(y)} "
        f"slices of {cohort.parent.name}/{cohort.name}, up to {t.classifier_epochs} epochs"
    )
    callbacks = phase_callbacks(
        run.out, "classification", t.early_stopping_patience, run.resume, patient_eval,
        save=classifier, log=run.log,
    )  # fmt: skip
    verbose, callbacks = keras_verbose(run.verbose, callbacks, t.classifier_epochs, run.log)
    head.fit(x, y, sample_weight=w, batch_size=t.batch_size, epochs=t.classifier_epochs,
             validation_data=(xv, yv), callbacks=callbacks, verbose=verbose)  # fmt: skip


def pooled_features(features, dataset, pneumonia_weight: int):
    """(pooled features, slice labels, sample weights) of every slice of a dataset."""
    xs, ys, ws = [], [], []
    for batch in dataset:
        diagnosis = batch["patient/diagnosis"].numpy().astype(str)
        # The "classify" task's slices: annotated ones, and every other pneumonia's slice.
        usable = [slice_is_usable("classify", a > 0, d)
                  for a, d in zip(batch["mask/annotated"].numpy(), diagnosis)]  # fmt: skip
        xs.append(np.asarray(features.predict_on_batch(batch["hu"][..., None]))[usable])
        ys.append(classify_label(batch).numpy()[usable])
        weight = np.where(np.isin(diagnosis, OTHER_PNEUMONIA), float(pneumonia_weight), 1.0)
        ws.append(weight[usable])
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)
