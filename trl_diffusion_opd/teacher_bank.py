"""LoRA teachers kept as plain tensors and run through a few shared PEFT adapters ("slots").

A PEFT adapter costs its weights plus a module per adapted layer (`lora_A`, `lora_B`, a dropout): on a small model
that is tens of times its weights in host memory, and every LoRA forward checks the active adapter against every
adapter's key. So the teachers do not each become an adapter: teachers that share a LoRA layout (the same config,
hence the same shapes) share one slot adapter, and each teacher is one flat tensor per dtype. Activating a teacher
points its slot's weights at views of that tensor (no copy); its outputs are those of the teacher loaded as an adapter
of its own, bit for bit, since the slot is built from the teacher's own `LoraConfig` and holds its exact weights.

The slot weights are non-persistent buffers, not parameters: no optimizer, gradient, checkpoint or sharding
(FSDP2, DeepSpeed) sees them, and switching teachers moves or gathers nothing. With a device budget
(`max_teachers_on_device`) the teachers wait on the host and at most `budget` of them have a device copy: the least
recently used one leaves first (its host copy stays exact: teachers are frozen), and the incoming teacher is copied
into its device buffers when their layouts match.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field

import torch
from peft import LoraConfig

from .lora_io import adapter_metadata, load_adapter_weights
from .teachers import TeacherSpec, add_adapter, read_teacher_lora


SLOT_PREFIX = "teacher_slot_"
# `LoraConfig` fields that describe where a file came from, not what the adapter computes.
_PROVENANCE = frozenset({"base_model_name_or_path", "revision", "inference_mode", "task_type", "runtime_config"})


def layout_key(config: LoraConfig) -> str:
    """What decides a LoRA adapter's modules and shapes: its config without provenance fields, as sorted JSON."""
    fields = {k: v for k, v in adapter_metadata(config).items() if k not in _PROVENANCE}
    return json.dumps(fields, sort_keys=True, default=str)


@dataclass(eq=False)
class _Slot:
    """One shared adapter: its weight entries `(owner module, attribute, shape, dtype group)` in the order of the
    flat tensors, each group's sizes, the entries' names in PEFT's naming without the adapter
    (`...to_q.lora_A.weight`), and the teacher they point at now."""

    name: str
    entries: list[tuple[torch.nn.Module, str, torch.Size, int]] = field(default_factory=list)
    sizes: list[list[int]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    current: str | None = None


class TeacherBank:
    """The LoRA teachers of a trainer, as flat tensors behind one slot adapter per (module, layout).

    Use: `add` every teacher (PEFT-format state dicts, as `lora_io.read_lora_folder` returns them), `finalize`
    once, `to` when the model is placed, then `activate(name)` before a teacher's forward pass and make the returned
    adapter names the active ones.

    Args:
        budget: Most teachers with a device copy at once (`None`: all of them, on the model's device).
    """

    def __init__(self, budget: int | None = None):
        self.budget = budget
        self._slots: dict[tuple[int, str], _Slot] = {}
        # teacher -> [(slot, flat tensors: one per dtype group)]: on the device, or on the host with a budget
        self._stored: dict[str, list[tuple[_Slot, list[torch.Tensor]]]] = {}
        self._prefixes: dict[str, list[str]] = {}  # teacher -> each part's key prefix (`weights`)
        # with a budget: the device copies of the resident teachers (least recently used first), and, during a
        # fetch, the evicted ones' buffers per (slot, dtype group), reused when the incoming teacher has that layout
        self._device: collections.OrderedDict[str, list[list[torch.Tensor]]] = collections.OrderedDict()
        self._free: dict[tuple[str, int], list[torch.Tensor]] = collections.defaultdict(list)
        self.copies = 0  # host-to-device copies made (with a budget), for benchmarks and tests
        self._finalized = False
        self._target: torch.device | None = None

    def __contains__(self, name: object) -> bool:
        return name in self._stored

    @property
    def names(self) -> list[str]:
        """The teachers held, in the order they were added."""
        return list(self._stored)

    @property
    def resident(self) -> list[str]:
        """With a budget: the teachers with a device copy, least recently used first."""
        return list(self._device)

    def load(
        self, module: torch.nn.Module, spec: TeacherSpec, weight_name: str | None = None, prefix: str = ""
    ) -> None:
        """Read teacher `spec`'s LoRA file for `module` (its folder's default file, or `weight_name`: another
        expert's) with `teachers.load_lora_teacher`'s checks, and `add` it."""
        state_dict, config, label = read_teacher_lora(module, spec, spec.local_dir, weight_name=weight_name)
        self.add(module, spec.name, state_dict, config, label, prefix)

    def add(
        self,
        module: torch.nn.Module,
        name: str,
        state_dict: dict[str, torch.Tensor],
        config: LoraConfig,
        label: str,
        prefix: str = "",
    ) -> None:
        """Store teacher `name`'s LoRA for `module` (one expert's transformer; a teacher may have one per expert,
        each given the `prefix` its keys take in `weights`, e.g. `"transformer_2."`).

        The first teacher of a layout makes its slot (a PEFT adapter with that config); every teacher's weights are
        loaded into its slot by PEFT and read back flat, so any file PEFT loads loads here, with PEFT's checks.
        """
        if self._finalized:
            raise RuntimeError("TeacherBank.add after finalize().")
        key = (id(module), layout_key(config))
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = self._new_slot(module, config)
        load_adapter_weights(module, state_dict, slot.name, label)
        flats = [
            torch.cat(
                [
                    getattr(owner, attribute).detach().reshape(-1)
                    for owner, attribute, _, g in slot.entries
                    if g == group
                ]
            )
            for group in range(len(slot.sizes))
        ]
        self._stored.setdefault(name, []).append((slot, flats))
        self._prefixes.setdefault(name, []).append(prefix)

    def _new_slot(self, module: torch.nn.Module, config: LoraConfig) -> _Slot:
        slot = _Slot(f"{SLOT_PREFIX}{len(self._slots)}")
        add_adapter(module, config, slot.name)
        dtypes: list[torch.dtype] = []
        for module_name, owner in module.named_modules():
            for attribute, param in owner.named_parameters(recurse=False):
                if f".{slot.name}." in f".{module_name}.{attribute}.":
                    if param.dtype not in dtypes:
                        dtypes.append(param.dtype)
                        slot.sizes.append([])
                    group = dtypes.index(param.dtype)
                    slot.entries.append((owner, attribute, param.shape, group))
                    slot.sizes[group].append(param.numel())
                    slot.keys.append(f"{module_name}.{attribute}".replace(f".{slot.name}.", ".").strip("."))
        return slot

    def finalize(self) -> None:
        """Turn every slot's weights into non-persistent buffers pointing at nothing (empty tensors): outside the
        parameters from now on, and loud (a shape error) if a slot ran without an activated teacher."""
        for slot in self._slots.values():
            for owner, attribute, _, _ in slot.entries:
                param = owner._parameters.pop(attribute)
                owner.register_buffer(attribute, param.new_empty(0), persistent=False)
        self._finalized = True

    def to(self, device: torch.device | str) -> None:
        """Place the teachers: all on `device` without a budget; on the host with one (pinned memory when `device`
        is CUDA, so that each copy in is asynchronous)."""
        device = torch.device(device)
        for slot in self._slots.values():
            self._point(slot, None, [])
        self._device.clear()
        self._free.clear()
        for name, parts in self._stored.items():
            if self.budget is None:
                self._stored[name] = [(slot, [flat.to(device) for flat in flats]) for slot, flats in parts]
            elif device.type == "cuda":
                self._stored[name] = [(slot, [flat.pin_memory() for flat in flats]) for slot, flats in parts]
        self._target = device

    def _flats(self, name: str) -> list[list[torch.Tensor]]:
        """Teacher `name`'s flat tensors on the device, copied in (least recently used teacher out) if need be."""
        parts = self._stored[name]
        if self.budget is None:
            return [flats for _, flats in parts]
        if name in self._device:
            self._device.move_to_end(name)
            return self._device[name]
        while len(self._device) >= self.budget:
            evicted, copies = self._device.popitem(last=False)
            for (slot, _), flats in zip(self._stored[evicted], copies):
                if slot.current == evicted:
                    self._point(slot, None, [])
                for group, flat in enumerate(flats):
                    self._free[slot.name, group].append(flat)
        device = self._target or parts[0][1][0].device
        copies = []
        for slot, flats in parts:
            copies.append([])
            for group, flat in enumerate(flats):
                free = self._free[slot.name, group]
                buffer = free.pop() if free else torch.empty_like(flat, device=device)
                copies[-1].append(buffer.copy_(flat, non_blocking=True))
        self._free.clear()  # evicted buffers of other layouts: the device holds at most `budget` teachers
        self._device[name] = copies
        self.copies += 1
        return copies

    @staticmethod
    def _point(slot: _Slot, name: str | None, flats: list[torch.Tensor]) -> None:
        """Point `slot`'s weight buffers at views of `flats` (teacher `name`), or at empty tensors (`None`)."""
        pieces = [iter(flat.split(sizes)) for flat, sizes in zip(flats, slot.sizes)]
        for owner, attribute, shape, group in slot.entries:
            if name is None:
                owner._buffers[attribute] = owner._buffers[attribute].new_empty(0)
            else:
                owner._buffers[attribute] = next(pieces[group]).view(shape)
        slot.current = name

    def activate(self, name: str) -> list[str]:
        """Point the slots of teacher `name` at its weights; returns the adapter names to make active."""
        slots = []
        for (slot, _), flats in zip(self._stored[name], self._flats(name)):
            if slot.current != name:
                self._point(slot, name, flats)
            slots.append(slot.name)
        return slots

    def weights(self, name: str) -> dict[str, torch.Tensor]:
        """Teacher `name`'s weights as stored (views), in PEFT's naming relative to its module (`...to_q.lora_A.weight`),
        each part's keys after its `prefix`."""
        out = {}
        for (slot, flats), prefix in zip(self._stored[name], self._prefixes[name]):
            pieces = [iter(flat.split(sizes)) for flat, sizes in zip(flats, slot.sizes)]
            for key, (_, _, shape, group) in zip(slot.keys, slot.entries):
                out[prefix + key] = next(pieces[group]).view(shape)
        return out

    def teacher_bytes(self, name: str) -> int:
        """Bytes of teacher `name`'s weights (every expert's)."""
        return sum(flat.numel() * flat.element_size() for _, flats in self._stored[name] for flat in flats)

    def resident_bytes(self) -> int:
        """Bytes of teacher weights on the device: every teacher's without a budget, else the resident ones'."""
        if self.budget is None:
            return sum(self.teacher_bytes(name) for name in self._stored)
        return sum(f.numel() * f.element_size() for copies in self._device.values() for flats in copies for f in flats)
