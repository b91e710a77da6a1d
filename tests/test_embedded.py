"""Known facts of the embedded SmolLM2-135M."""
import torch


def test_embedded_knows_paris(embedded):
    mt = embedded
    assert mt.adapter.family == "llama" and mt.num_layers == 30
    ids = mt.tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        probs = mt.model(ids).logits[0, -1].softmax(-1)
    p, top = probs.max(-1)
    assert mt.tokenizer.decode([int(top)]) == " Paris"
    assert p.item() > 0.5


def test_embedded_blockwise_matches_model(embedded):
    mt = embedded
    ids = mt.tokenizer("Miles Davis plays the", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(mt.adapter.forward_blockwise(ids), mt.model(ids).logits,
                                   rtol=0, atol=1e-4)
