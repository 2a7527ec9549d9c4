"""Reads `nolad export` outputs back with the real tools' loaders (docs/exports.md); outside CI.

  --imagefolder TREE     torchvision.datasets.ImageFolder: every image is decoded through it
  --labelstudio TASKS    label-studio-sdk: the config next to TASKS is parsed by LabelInterface and
                         every task's prediction is validated against it
  --fiftyone DIR         fiftyone's FiftyOneImageClassificationDatasetImporter (what
                         fo.Dataset.from_dir iterates): every sample parsed into a Classification and
                         an in-memory fo.Sample, no database needed; with --fiftyone-dataset also
                         fo.Dataset.from_dir itself, which needs FiftyOne's MongoDB

Each check prints one line with what it read and exits non-zero on the first failure. torchvision is in
the reference environment (reference/requirements.txt); label-studio-sdk and fiftyone are heavy and
belong in a throw-away venv (python3 -m venv ../nolad-export-venv).
"""
import argparse
import json
import os
import sys


def check_imagefolder(tree):
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(tree)
    sizes = set()
    for i in range(len(dataset)):
        image, target = dataset[i]  # opens and decodes the file through the link or copy
        assert 0 <= target < len(dataset.classes)
        sizes.add(image.size)
    counts = {c: 0 for c in dataset.classes}
    for _, target in dataset.samples:
        counts[dataset.classes[target]] += 1
    print(f"imagefolder: torchvision ImageFolder read {len(dataset)} images in {len(dataset.classes)} classes "
          f"{counts}; all decoded ({len(sizes)} distinct sizes)")
    return len(dataset)


def check_labelstudio(tasks_path):
    from label_studio_sdk.label_interface import LabelInterface

    config_path = (tasks_path[:-5] if tasks_path.endswith(".json") else tasks_path) + ".label_config.xml"
    with open(config_path) as f:
        config = f.read()
    interface = LabelInterface(config)
    control = interface.get_control("label")
    choices = list(control.labels)
    image_object = interface.get_object("image")
    assert image_object.value_name == "image", image_object.value_name
    with open(tasks_path) as f:
        tasks = json.load(f)
    assert isinstance(tasks, list) and tasks, "a non-empty list of tasks"
    ids = set()
    for task in tasks:
        assert set(task) == {"data", "predictions"}, task.keys()
        assert isinstance(task["data"]["image"], str)
        for prediction in task["predictions"]:
            errors = interface.validate_prediction(prediction, return_errors=True)
            assert not errors, (errors, prediction)
            for result in prediction["result"]:
                assert result["value"]["choices"][0] in choices, result
                assert result["id"] not in ids, result["id"]
                ids.add(result["id"])
            assert 0.0 <= prediction["score"] <= 1.0
    print(f"labelstudio: label-studio-sdk LabelInterface parsed the config (Image 'image', Choices 'label' with "
          f"{len(choices)} choices) and validated {len(tasks)} tasks' predictions")
    return len(tasks)


def check_fiftyone(folder, with_database):
    import fiftyone as fo
    import fiftyone.core.labels as fol
    import fiftyone.utils.data as foud

    with open(os.path.join(folder, "labels.json")) as f:
        classes = json.load(f)["classes"]
    importer = foud.FiftyOneImageClassificationDatasetImporter(dataset_dir=folder)
    count, confident = 0, 0
    with importer:
        for image_path, _metadata, label in importer:
            assert os.path.isfile(image_path), image_path  # follows the link
            assert isinstance(label, fol.Classification), (image_path, label)
            assert label.label in classes, label  # the index was mapped to its class name
            if label.confidence is not None:
                assert 0.0 <= label.confidence <= 1.0
                confident += 1
            # What fo.Dataset.from_dir makes of each (path, metadata, label), short of the database.
            sample = fo.Sample(filepath=image_path)
            sample["nolad"] = label
            assert sample.filepath == os.path.abspath(image_path)
            count += 1
    print(f"fiftyone: FiftyOneImageClassificationDatasetImporter read {count} samples, "
          f"{confident} with a confidence")
    if with_database:
        dataset = fo.Dataset.from_dir(dataset_dir=folder, dataset_type=fo.types.FiftyOneImageClassificationDataset,
                                      label_field="nolad")
        print(f"fiftyone: fo.Dataset.from_dir loaded {len(dataset)} samples; "
              f"labels {dataset.count_values('nolad.label')}")
        dataset.delete()
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imagefolder")
    parser.add_argument("--labelstudio")
    parser.add_argument("--fiftyone")
    parser.add_argument("--fiftyone-dataset", action="store_true", help="also load it into a FiftyOne dataset (starts its database)")
    parser.add_argument("--expect", type=int, help="the number of images each export must hold")
    args = parser.parse_args()
    counts = []
    if args.imagefolder:
        counts.append(check_imagefolder(args.imagefolder))
    if args.labelstudio:
        counts.append(check_labelstudio(args.labelstudio))
    if args.fiftyone:
        counts.append(check_fiftyone(args.fiftyone, args.fiftyone_dataset))
    if not counts:
        parser.error("name at least one export to check")
    if args.expect is not None and any(c != args.expect for c in counts):
        sys.exit(f"expected {args.expect} images in each export, read {counts}")
    print("all exports read back")


if __name__ == "__main__":
    main()
