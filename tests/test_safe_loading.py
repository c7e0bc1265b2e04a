"""Checkpoint files never unpickle code: a tampered pickle is refused before its payload runs; the reward server
listens on loopback unless told otherwise."""

import pickle

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open

from trl_diffusion_opd import FlowGRPOConfig, FlowGRPOTrainer
from trl_diffusion_opd.rewards.server import make_parser, serve
from trl_diffusion_opd.safe_io import load_ema_state, load_tensor_tree, save_ema_state, save_tensor_tree
from trl_diffusion_opd.testing import get_tiny_sd3_pipeline
from trl_diffusion_opd.world.pretrain import PretrainConfig, load_checkpoint_state, pretrain


class _Payload:
    """Unpickling this calls `exec`, which writes `marker`: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _tampered(path, marker, **state):
    torch.save({**state, "payload": _Payload(marker)}, path)


def test_the_payload_is_real(tmp_path):
    # the test below is meaningful: an ordinary unpickling of such a file does run the payload
    marker = tmp_path / "ran"
    _tampered(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.read_text() == "pwned"


def test_resume_never_unpickles_an_ema_state(tmp_path):
    args = FlowGRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        resolution=32,
        num_inference_steps=2,
        num_generations=2,
        per_device_train_batch_size=1,
        max_sequence_length=1,
        save_strategy="steps",
        save_steps=1,
        ema=True,
        ema_update_interval=1,
        report_to="none",
        disable_tqdm=True,
        guidance_scale=1.0,
        beta=0.0,
    )
    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["attn.to_q"])
    trainer = FlowGRPOTrainer(
        get_tiny_sd3_pipeline(with_t5=False), "brightness", args=args, train_dataset=["a", "b"], peft_config=lora
    )
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    # the EMA state is safetensors + JSON, and reads back to the same values
    state = load_ema_state(checkpoint / "ema_state.safetensors")
    assert state["optimization_step"] == trainer.ema.optimization_step == 1
    assert all(torch.equal(a, b.cpu()) for a, b in zip(state["shadow_params"], trainer.ema.shadow_params))
    trainer._load_from_checkpoint(str(checkpoint))  # the genuine checkpoint loads

    # a tampered pickle in the EMA state's place is never read: nothing ran
    (checkpoint / "ema_state.safetensors").unlink()
    marker = tmp_path / "ran"
    _tampered(checkpoint / "ema_state.pt", marker, **trainer.ema.state_dict())
    trainer._load_from_checkpoint(str(checkpoint))
    assert not marker.exists()


def test_world_pretraining_refuses_a_tampered_checkpoint(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    _tampered(tmp_path / "run" / "checkpoint" / "state.pt", marker, step=3)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint_state(tmp_path / "run" / "checkpoint" / "state.pt")
    with pytest.raises(pickle.UnpicklingError):
        pretrain(PretrainConfig(output_dir=str(tmp_path / "run"), steps=1, eval_images=0, progress=False))
    assert not marker.exists()


def test_tensor_tree_round_trip_is_exact_and_refuses_objects(tmp_path):
    states = torch.randn(3, 2, 4)
    tree = {
        "states": states,
        "x0": states[-1],  # a view: stored as its own copy
        "cond": {"prompt_embeds": torch.randn(2, 5).bfloat16()},
        "rows": [{"prompt": "a", "score": 0.1}, {"prompt": "b", "tags": ["x", None]}],
        "count": 2,
    }
    save_tensor_tree(tree, tmp_path / "tree.safetensors")
    back = load_tensor_tree(tmp_path / "tree.safetensors")
    assert torch.equal(back["states"], states) and torch.equal(back["x0"], states[-1])
    assert back["cond"]["prompt_embeds"].dtype == torch.bfloat16
    assert torch.equal(back["cond"]["prompt_embeds"], tree["cond"]["prompt_embeds"])
    assert back["rows"] == tree["rows"] and back["count"] == 2
    with pytest.raises(TypeError, match="without pickle"):
        save_tensor_tree({"rows": [{"image": object()}]}, tmp_path / "bad.safetensors")
    # the EMA helper round-trips too
    ema = {
        "decay": 0.9,
        "min_decay": 0.9,
        "optimization_step": 7,
        "shadow_params": [torch.randn(3), torch.randn(2, 2)],
    }
    save_ema_state(ema, tmp_path / "ema.safetensors")
    loaded = load_ema_state(tmp_path / "ema.safetensors")
    assert loaded["optimization_step"] == 7 and loaded["decay"] == 0.9
    assert all(torch.equal(a, b) for a, b in zip(loaded["shadow_params"], ema["shadow_params"]))


def test_tensors_read_back_sit_in_aligned_memory_of_their_own(tmp_path):
    # 3 floats before it put "t1" 12 bytes past an 8-byte boundary in the file, where safetensors hands it out
    tree = {"a": torch.randn(3), "b": torch.randn(2, 64)}
    save_tensor_tree(tree, tmp_path / "tree.safetensors")
    save_ema_state({"decay": 0.9, "shadow_params": list(tree.values())}, tmp_path / "ema.safetensors")
    with safe_open(str(tmp_path / "tree.safetensors"), framework="pt") as handle:
        # the case: safetensors hands the tensor out where it lies in the file, off alignment
        assert handle.get_tensor("t1").data_ptr() % 16 != 0, "safetensors now aligns: this test covers nothing"
    loaded = [*load_tensor_tree(tmp_path / "tree.safetensors").values()]
    loaded += load_ema_state(tmp_path / "ema.safetensors")["shadow_params"]
    # CPU kernels round differently on misaligned inputs: a resumed step must see what the saving run saw
    assert [t.data_ptr() % 64 for t in loaded] == [0, 0, 0, 0]
    assert all(torch.equal(a, b) for a, b in zip(loaded, [*tree.values(), *tree.values()]))


def test_reward_server_listens_on_loopback_by_default():
    assert make_parser().parse_args(["--scorer", "m:f"]).host == "127.0.0.1"
    server = serve(lambda images, prompts, metadata: [0.0] * len(images), port=0)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()
