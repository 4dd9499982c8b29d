"""Class words of captions: which classes a caption names, and the naming rates of a split."""
import json

import pytest

from pretrain.downstream.class_words import (
    class_naming,
    class_vocabulary,
    evaluate_class_naming,
    named_classes,
)
from pretrain.errors import BadValueError

CATEGORIES = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 67, "name": "dining table"},
              {"id": 64, "name": "potted plant"}, {"id": 90, "name": "toothbrush"}, {"id": 55, "name": "orange"}]


@pytest.fixture()
def instances(tmp_path):
    path = tmp_path / "instances_val2017.json"
    annotations = [{"id": 1, "image_id": 1, "category_id": 18}, {"id": 2, "image_id": 1, "category_id": 1},
                   {"id": 3, "image_id": 2, "category_id": 67}, {"id": 4, "image_id": 3, "category_id": 90}, {"id": 5, "image_id": 4, "category_id": 64}]
    path.write_text(json.dumps({"images": [{"id": i} for i in (1, 2, 3, 4)], "annotations": annotations,
                                "categories": CATEGORIES}))
    return path


def test_words_of_the_world_and_of_coco_name_their_class(instances):
    vocabulary = class_vocabulary(instances)
    assert named_classes("Two women and a puppy.", vocabulary) == {1, 18}  # built-in synonyms, plurals
    assert named_classes("toothbrushes on a dining table", vocabulary) == {90, 67}  # COCO names, plural
    # The longest phrase wins: a "dining table" is not also a bare "table"; "plant" inside a word is no plant.
    assert named_classes("a plant by the tables", vocabulary) == {64, 67}
    assert named_classes("the planter of a doge", vocabulary) == set()
    # A category the file lists but never annotates is no class of this data (the built-in world
    # lists all 80 COCO categories and draws 20): its name is a colour here, not a fruit.
    assert named_classes("an orange dog", vocabulary) == {18}


def test_naming_rates_and_per_class_precision_recall(instances):
    captions = {1: "a dog next to a man", 2: "a dog on a red background", 3: "nothing here", 4: "a person"}
    result = evaluate_class_naming(captions, instances)
    assert result["images"] == 4
    assert result["names_present"] == pytest.approx(1 / 4)  # only image 1 names what it shows
    assert result["names_absent"] == pytest.approx(2 / 4)  # image 2's dog, image 4's person
    dog = result["per_class"]["dog"]
    assert (dog["named"], dog["present"], dog["precision"], dog["recall"]) == (2, 1, 0.5, 1.0)
    assert result["per_class"]["toothbrush"]["recall"] == 0.0
    assert result["per_class"]["toothbrush"]["precision"] is None  # never named
    assert "orange" not in result["per_class"]  # neither named nor shown


def test_captions_of_images_the_instances_do_not_list_are_refused(instances):
    with pytest.raises(BadValueError, match="lists no image 99"):
        evaluate_class_naming({99: "a dog"}, instances)


def test_an_empty_split_rates_zero():
    assert class_naming({}, {}, {}, {})["names_present"] == 0.0
