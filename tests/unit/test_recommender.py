"""The recommender predictor in-process: v1 and v2 parsing, ranking rules, readiness.

A tiny seeded SASRec artifact (30 items) is written once per module; requests go through
KServe's ``Model.__call__`` (preprocess -> predict -> postprocess) as the server runs
them, without HTTP.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse

from serving.recommender import MAX_K, RecommenderModel, rank_items
from shopml.artifact import MANIFEST_FILE, MODEL_FILE, save_model_artifact
from shopml.models.sasrec import SASRec, SASRecConfig

N_ITEMS = 30
MAX_SEQ_LEN = 20


def item_id(index: int) -> str:
    """Item ids are opaque strings unrelated to the model index."""
    return str(100 + index)


def write_tiny_artifact(path: Path) -> Path:
    """A seeded, untrained SASRec over 30 items; popularity grows with the index."""
    torch.manual_seed(0)
    config = SASRecConfig(
        n_items=N_ITEMS, max_seq_len=MAX_SEQ_LEN, hidden_size=32, n_heads=2, n_layers=2
    )
    items = pd.DataFrame(
        {
            "index": np.arange(1, N_ITEMS + 1),
            "item_id": [item_id(i) for i in range(1, N_ITEMS + 1)],
            "title": [f"Title {i}" for i in range(1, N_ITEMS + 1)],
        }
    )
    popularity = np.arange(N_ITEMS + 1, dtype=np.float32)
    save_model_artifact(path, SASRec(config), items, popularity)
    return path


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_artifact(tmp_path_factory.mktemp("artifact") / "model")


@pytest.fixture(scope="module")
def model(artifact_dir: Path) -> RecommenderModel:
    recommender = RecommenderModel("recommender", artifact_dir, None, None)
    assert recommender.load() is True
    return recommender


def call(
    model: RecommenderModel, body: Any, headers: dict[str, str] | None = None
) -> Any:
    """Run one request through KServe's handler chain, as the server does."""
    response, _ = asyncio.run(model(body, headers=headers or {}))
    return response


def v2_request(
    inputs: list[InferInput], request_id: str | None = "req-1"
) -> InferRequest:
    return InferRequest("recommender", inputs, request_id=request_id)


def bytes_input(name: str, shape: list[int], data: list[Any]) -> InferInput:
    return InferInput(name, shape, "BYTES", data)


def v2_outputs(response: InferResponse) -> dict[str, np.ndarray]:
    return {output.name: output.as_numpy() for output in response.outputs}


# --- v1 ---------------------------------------------------------------------------


def test_v1_item_history_returns_k_unseen_items_with_titles(
    model: RecommenderModel,
) -> None:
    history = [item_id(1), item_id(2), item_id(3)]
    body = {"instances": [{"item_ids": [*history, "no-such-item"], "k": 5}]}

    [prediction] = call(model, body)["predictions"]

    assert len(prediction["item_ids"]) == 5
    assert not set(prediction["item_ids"]) & set(history)
    assert len(set(prediction["item_ids"])) == 5
    indices = [int(i) - 100 for i in prediction["item_ids"]]
    assert prediction["titles"] == [f"Title {i}" for i in indices]
    assert prediction["scores"] == sorted(prediction["scores"], reverse=True)
    assert prediction["unknown_item_ids"] == ["no-such-item"]


def test_v1_k_defaults_to_ten(model: RecommenderModel) -> None:
    [prediction] = call(model, {"instances": [{"item_ids": [item_id(4)]}]})[
        "predictions"
    ]
    assert len(prediction["item_ids"]) == 10


def test_v1_empty_history_gets_popularity_ranking(model: RecommenderModel) -> None:
    [prediction] = call(model, {"instances": [{"item_ids": [], "k": 3}]})["predictions"]

    # Popularity equals the index here, so the most popular items are 30, 29, 28.
    assert prediction["item_ids"] == [item_id(30), item_id(29), item_id(28)]
    assert prediction["scores"] == [30.0, 29.0, 28.0]


def test_v1_history_longer_than_max_seq_len_is_still_fully_excluded(
    model: RecommenderModel,
) -> None:
    history = [item_id(i) for i in range(1, MAX_SEQ_LEN + 6)]  # 25 items, window is 20

    [prediction] = call(model, {"instances": [{"item_ids": history, "k": 5}]})[
        "predictions"
    ]

    assert sorted(prediction["item_ids"]) == [item_id(i) for i in range(26, 31)]


def test_batch_rows_are_scored_in_one_forward_pass(model: RecommenderModel) -> None:
    assert model.artifact is not None
    calls: list[tuple[int, ...]] = []
    # The encoder runs once per forward pass: count its calls and input shapes.
    hook = model.artifact.model.encoder.register_forward_hook(
        lambda _module, inputs, _output: calls.append(tuple(inputs[0].shape))
    )
    body = {
        "instances": [
            {"item_ids": [item_id(1)]},
            {"item_ids": [item_id(2), item_id(3)]},
            {"item_ids": []},  # popularity: needs no forward pass
            {"item_ids": [item_id(4)], "k": 2},
        ]
    }
    try:
        predictions = call(model, body)["predictions"]
    finally:
        hook.remove()

    # [B', L, H]: three rows with history, padded to the longest of them (2 items)
    assert calls == [(3, 2, 32)]
    assert [len(p["item_ids"]) for p in predictions] == [10, 10, 10, 2]


def test_rank_items_returns_fewer_than_k_when_history_covers_the_catalog(
    model: RecommenderModel,
) -> None:
    assert model.artifact is not None
    history = list(range(1, N_ITEMS - 1))  # all but items 29 and 30

    [(items, scores)] = rank_items(model.artifact, [history], [10])

    assert sorted(items) == [29, 30]
    assert all(np.isfinite(scores))


def test_user_rows_without_feature_store_fail_with_a_clear_error(
    model: RecommenderModel,
) -> None:
    with pytest.raises(InferenceError, match="without a feature store"):
        call(model, {"instances": [{"user_id": "196"}]})


# --- v2 ---------------------------------------------------------------------------


def test_v2_batch_with_padding_matches_v1(model: RecommenderModel) -> None:
    request = v2_request(
        [
            bytes_input(
                "item_ids", [2, 3], [item_id(1), item_id(2), "", item_id(5), "x", ""]
            ),
            InferInput("k", [1], "INT32", [4]),
        ]
    )

    response = call(model, request)
    outputs = v2_outputs(response)
    v1 = call(
        model,
        {
            "instances": [
                {"item_ids": [item_id(1), item_id(2)], "k": 4},
                {"item_ids": [item_id(5), "x"], "k": 4},
            ]
        },
    )["predictions"]

    assert isinstance(response, InferResponse)
    assert response.id == "req-1"
    assert outputs["item_ids"].shape == (2, 4)
    assert outputs["scores"].dtype == np.float32
    assert outputs["item_ids"].tolist() == [p["item_ids"] for p in v1]
    assert outputs["titles"].tolist() == [p["titles"] for p in v1]
    np.testing.assert_allclose(outputs["scores"], [p["scores"] for p in v1], rtol=1e-6)
    assert outputs["unknown_item_ids"].tolist() == [[""], ["x"]]


def test_v2_one_dimensional_item_ids_is_one_row_with_default_k(
    model: RecommenderModel,
) -> None:
    request = v2_request([bytes_input("item_ids", [2], [item_id(7), item_id(8)])], None)

    response = call(model, request, headers={"x-request-id": "from-header"})
    outputs = v2_outputs(response)

    assert response.id == "from-header"
    assert outputs["item_ids"].shape == (1, 10)
    assert not {item_id(7), item_id(8)} & set(outputs["item_ids"][0])


def test_v2_response_serializes_to_rest_json(model: RecommenderModel) -> None:
    request = v2_request([bytes_input("item_ids", [1], [item_id(1)])])

    body, json_length = call(model, request).to_rest()

    assert json_length is None
    assert [output["name"] for output in body["outputs"]] == [
        "item_ids",
        "titles",
        "scores",
        "unknown_item_ids",
    ]
    assert body["outputs"][0]["shape"] == [1, 10]
    assert len(body["outputs"][0]["data"]) == 10


# --- invalid requests ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param({"rows": []}, "'instances' is missing", id="no-instances"),
        pytest.param(
            {
                "inputs": [
                    {
                        "name": "user_id",
                        "shape": [1],
                        "datatype": "BYTES",
                        "data": ["1"],
                    }
                ]
            },
            "this is a v2 body",
            id="v2-body-on-v1",
        ),
        pytest.param(
            {"instances": []}, "'instances' must be a non-empty list", id="empty"
        ),
        pytest.param({"instances": {"k": 1}}, "got dict", id="instances-not-list"),
        pytest.param(
            {"instances": ["196"]}, r"instances\[0\] must be an object", id="row-str"
        ),
        pytest.param(
            {"instances": [{"k": 5}]}, "exactly one of user_id or item_ids", id="none"
        ),
        pytest.param(
            {"instances": [{"user_id": "1", "item_ids": []}]}, "exactly one", id="both"
        ),
        pytest.param(
            {"instances": [{"item_ids": [], "n": 3}]},
            r"unknown field\(s\) \['n'\]",
            id="field",
        ),
        pytest.param(
            {"instances": [{"item_ids": "242"}]}, "must be a list", id="ids-str"
        ),
        pytest.param(
            {"instances": [{"item_ids": [242]}]},
            r"item_ids\[0\]=242 must be a string",
            id="id-int",
        ),
        pytest.param(
            {"instances": [{"user_id": 196}]},
            "user_id must be a non-empty string",
            id="user-int",
        ),
        pytest.param(
            {"instances": [{"item_ids": [], "k": 0}]}, r"\.k=0 must be between", id="k0"
        ),
        pytest.param(
            {"instances": [{"item_ids": [], "k": MAX_K + 1}]},
            "k=101 must be between",
            id="k-big",
        ),
        pytest.param(
            {"instances": [{"item_ids": [], "k": "5"}]},
            r"instances\[0\].k must be an integer between 1 and 100, got str",
            id="k-str",
        ),
        pytest.param(
            {"instances": [{"item_ids": [], "k": True}]}, "k=True must be", id="k-bool"
        ),
        pytest.param(
            {"instances": [{"item_ids": [], "k": 2.5}]}, "k=2.5 must be", id="k-float"
        ),
    ],
)
def test_bad_v1_bodies_raise_invalid_input_naming_the_field(
    model: RecommenderModel, body: Any, expected: str
) -> None:
    with pytest.raises(InvalidInput, match=expected):
        call(model, body)


def test_raw_user_id_is_not_echoed_in_errors(model: RecommenderModel) -> None:
    with pytest.raises(InvalidInput) as raised:
        call(model, {"instances": [{"user_id": "secret-user-196", "k": 0}]})
    assert "secret-user-196" not in str(raised.value)


def test_non_json_v1_body_names_the_content_type(model: RecommenderModel) -> None:
    with pytest.raises(InvalidInput, match="content-type 'text/plain'"):
        call(model, b'{"instances": []}', headers={"content-type": "text/plain"})


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        pytest.param(
            [bytes_input("user_id", [1], ["1"]), bytes_input("item_ids", [1], ["101"])],
            "exactly one of the inputs",
            id="both",
        ),
        pytest.param([InferInput("k", [1], "INT32", [3])], "exactly one", id="neither"),
        pytest.param(
            [bytes_input("item_ids", [1], ["101"]), bytes_input("user", [1], ["1"])],
            r"unknown input\(s\) \['user'\]",
            id="unknown",
        ),
        pytest.param(
            [InferInput("item_ids", [1], "INT32", [101])],
            "datatype INT32; it must be BYTES",
            id="dtype",
        ),
        pytest.param(
            [bytes_input("item_ids", [2, 2], ["101", "102", "103"])],
            r"does not fit its shape \[2, 2\]",
            id="shape",
        ),
        pytest.param(
            [bytes_input("user_id", [1, 1], ["1"])],
            r"user_id' has shape \[1, 1\]",
            id="user-2d",
        ),
        pytest.param(
            [
                bytes_input("item_ids", [1], ["101"]),
                InferInput("k", [1], "FP32", [3.0]),
            ],
            "input 'k' has datatype FP32",
            id="k-dtype",
        ),
        pytest.param(
            [bytes_input("item_ids", [1], ["101"]), InferInput("k", [1], "INT32", [0])],
            r"k\[0\]=0 must be between",
            id="k0",
        ),
        pytest.param(
            [
                bytes_input("item_ids", [3, 1], ["1", "2", "3"]),
                InferInput("k", [2], "INT32", [1, 2]),
            ],
            r"input 'k' has shape \[2\]; it must be \[1\] or \[3\]",
            id="k-shape",
        ),
        pytest.param(
            [bytes_input("user_id", [1], ["1"]), bytes_input("user_id", [1], ["2"])],
            r"input\(s\) \['user_id'\] are sent more than once",
            id="repeated",
        ),
        pytest.param(
            [bytes_input("user_id", [-1], ["1"])],
            r"input 'user_id' has a negative dimension in shape \[-1\]",
            id="negative-shape",
        ),
    ],
)
def test_bad_v2_requests_raise_invalid_input_naming_the_input(
    model: RecommenderModel, inputs: list[InferInput], expected: str
) -> None:
    with pytest.raises(InvalidInput, match=expected):
        call(model, v2_request(inputs))


# --- readiness --------------------------------------------------------------------


def test_missing_artifact_never_becomes_ready(tmp_path: Path) -> None:
    recommender = RecommenderModel("recommender", tmp_path / "absent", None, None)

    assert recommender.load() is False
    recommender.start()  # what ModelServer calls while registering

    assert recommender.ready is False
    with pytest.raises(InferenceError, match="not loaded"):
        recommender.recommend([])


@pytest.mark.parametrize("damaged", [MODEL_FILE, MANIFEST_FILE])
def test_corrupt_artifact_never_becomes_ready(tmp_path: Path, damaged: str) -> None:
    folder = write_tiny_artifact(tmp_path / "model")
    with (folder / damaged).open("ab") as handle:
        handle.write(b"garbage")
    recommender = RecommenderModel("recommender", folder, None, None)

    assert recommender.load() is False
    assert recommender.ready is False


def test_feature_client_without_pseudonymizer_is_rejected(artifact_dir: Path) -> None:
    from shopml.features import OnlineFeatureClient

    client = OnlineFeatureClient.__new__(OnlineFeatureClient)  # never contacted
    with pytest.raises(ValueError, match="needs a pseudonymizer"):
        RecommenderModel("recommender", artifact_dir, client, None)


def k_input(
    datatype: str, data: list[Any], shape: list[int] | None = None
) -> InferInput:
    return InferInput("k", shape or [len(data)], datatype, data)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        pytest.param(
            k_input("UINT8", [300]),
            r"input 'k' \(UINT8\) element 0=300 does not fit datatype UINT8",
            id="uint8",
        ),
        pytest.param(
            k_input("INT8", [-200]), r"element 0=-200 does not fit datatype INT8"
        ),
        pytest.param(
            k_input("INT16", [70000]), r"element 0=70000 does not fit datatype INT16"
        ),
        pytest.param(
            k_input("INT32", [2**40]),
            rf"element 0={2**40} does not fit datatype INT32",
            id="int32",
        ),
        pytest.param(
            k_input("UINT64", [-1]), r"element 0=-1 does not fit datatype UINT64"
        ),
        pytest.param(
            k_input("INT32", [2.7]),
            r"input 'k' \(INT32\) element 0=2.7 must be an integer, got float",
            id="fraction",
        ),
        pytest.param(
            k_input("INT32", [3, 4]),
            r"input 'k' has shape \[2\]; it must be \[1\]$",
            id="k-shape-one-row",
        ),
    ],
)
def test_v2_k_outside_its_datatype_or_not_an_integer_is_invalid_input(
    model: RecommenderModel, k: InferInput, expected: str
) -> None:
    with pytest.raises(InvalidInput, match=expected):
        call(model, v2_request([bytes_input("item_ids", [1], ["101"]), k]))


def test_v2_k_as_text_is_refused_without_echoing_it(model: RecommenderModel) -> None:
    k = k_input("INT32", ["alice@example.com"])

    with pytest.raises(InvalidInput) as raised:
        call(model, v2_request([bytes_input("item_ids", [1], ["101"]), k]))

    assert "input 'k' (INT32) element 0 must be an integer, got str" in str(
        raised.value
    )
    assert "alice" not in str(raised.value)


def test_v2_explain_parameter_is_refused_not_ignored(model: RecommenderModel) -> None:
    request = v2_request([bytes_input("item_ids", [1], ["101"])])
    request.parameters = {"explain": True}

    with pytest.raises(InvalidInput, match="parameter 'explain' is not supported"):
        call(model, request)
