"""Hugging Face checkpoint directories (config.json + safetensors weights, one file or shards with an index):
reading one tensor at a time, and rewriting a checkpoint tensor by tensor into a new directory, so that a
multi-gigabyte model never has to fit in memory.

Memory: reading every tensor of a 2.07 GB bf16 file (largest tensor 131 MB) one by one, touching each
tensor's bytes and dropping it, peaks at the file's size in RSS (+1.98 GB) with one ``safe_open`` kept open
(the touched pages of the mapping stay resident while the file is mapped), but at the largest tensor
(+128 MB) with one ``safe_open`` per tensor, about as fast (1.0-1.3 s against 0.7-1.1 s, warm page cache;
safe_open's ``pread`` backend, or ``readinto`` at offsets read from the header ourselves: same RSS, 1.3-1.6 s).
So :meth:`Checkpoint.get` opens the file for each tensor, and safetensors alone reads the headers.
Writing a tensor's bytes through a numpy view takes 1.3 s per 2 GB; ``tobytes()`` 5.7-7.7 s and a copy.
On a TinyLlama-1.1B-shaped checkpoint (2.2 GB bf16, two shards; benchmarks/hf_scale_floor.py) the identity
rewrite takes 2.5-3.9 s and +128 MB of RSS; reading with safetensors and writing with its save_file per
shard takes 4.9-6.9 s and +1.9 GB.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
import zipfile

import torch
from safetensors import safe_open

from ..errors import (
    InvalidArgumentError,
    ModelFileError,
    UnsupportedModelError,
    first_line,
)
from . import parallel

CONFIG = "config.json"
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_WEIGHTS, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

# safetensors' dtype codes (its header's "dtype")
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}

# Weight files in any format hold the old model: the writer does not copy them (a stale pytorch_model.bin
# or original/consolidated.pth beside the new weights would be loaded, or published, as the grown model).
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx|onnx_data)|.*\.index\.json")


def _read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such file; a Hugging Face checkpoint needs its {what}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path} is not valid JSON: {first_line(exc)}") from None


def allowed_roots(folder: str) -> list:
    """Where the checkpoint's files may lie once symlinks are resolved: the folder, and for a snapshot of
    the Hugging Face cache (``.../snapshots/<revision>``, whose files link to ``../../blobs``) that blobs folder."""
    roots = [os.path.realpath(folder)]
    snapshots = os.path.dirname(os.path.abspath(folder))
    if os.path.basename(snapshots) == "snapshots":
        roots.append(os.path.realpath(os.path.join(snapshots, os.pardir, "blobs")))
    return roots


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def check_inside(folder: str, name: str, roots: list) -> str:
    """The path of the file ``name`` of the checkpoint ``folder``, refused when it lies outside the folder
    (an index, or a symlink, must not make graphgrow read, and copy into its output, any other file)."""
    target = os.path.realpath(os.path.join(folder, name))
    if os.path.isabs(name) or ".." in re.split(r"[\\/]", name) or not any(_inside(target, r) for r in roots):
        raise ModelFileError(f"{folder}: the file {name!r} lies outside the checkpoint directory; refusing to "
                             f"read it")
    return os.path.join(folder, name)


def _load_pickle(path: str) -> dict:
    try:  # mmap: tensors are read from the file when touched (torch maps only its zip format, not the legacy one)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as exc:  # noqa: BLE001 - torch raises several types
        raise ModelFileError(f"{path} is not a loadable PyTorch weights file: {first_line(exc)}") from None


class Checkpoint:
    """A Hugging Face checkpoint directory opened for reading: its config and its tensors' names, shapes and
    dtypes (from the file headers); :meth:`get` reads one tensor.  Make one with :meth:`open`."""

    def __init__(self, path: str, config: dict, pickled: bool, index: str | None, shards: list, meta: dict):
        self.path, self.config, self.pickled, self.index = path, config, pickled, index
        self.shards = shards  # [(file name, [tensor names in storage order])]
        self._meta = meta  # name -> (file name, shape, dtype)
        self._pickle_cache = (None, None)  # (file name, state dict) of the last pickled file read

    @classmethod
    def open(cls, path, *, allow_pickle: bool = False) -> Checkpoint:
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise InvalidArgumentError(f"{path} is not a directory; a Hugging Face checkpoint is a directory "
                                       f"with {CONFIG} and weights")
        roots = allowed_roots(path)
        config = _read_json(check_inside(path, CONFIG, roots), CONFIG)
        if not isinstance(config, dict):
            raise ModelFileError(f"{os.path.join(path, CONFIG)} is not a JSON object")
        # transformers' order of preference
        for single, index, pickled in ((SAFE_WEIGHTS, None, False), (None, SAFE_INDEX, False),
                                       (PICKLE_WEIGHTS, None, True), (None, PICKLE_INDEX, True)):
            if os.path.lexists(os.path.join(path, single or index)):
                break
        else:
            raise ModelFileError(f"{path} holds no weights ({SAFE_WEIGHTS}, {SAFE_INDEX}, {PICKLE_WEIGHTS} or "
                                 f"{PICKLE_INDEX})")
        if pickled and not allow_pickle:
            raise InvalidArgumentError(f"{path} holds only pickled weights, and pickled checkpoints can run code when "
                                       f"loaded; pass --allow-pickle (allow_pickle=True) to load them with "
                                       f"torch.load(weights_only=True)")
        listed = {}
        if index:
            index_path = check_inside(path, index, roots)
            data = _read_json(index_path, index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ModelFileError(f"{index_path} has no weight_map object naming each tensor's file")
            for name, file in weight_map.items():
                listed.setdefault(file, []).append(name)
        files = sorted(listed) if index else [single]
        shards, meta = [], {}
        for file in files:
            file_path = check_inside(path, file, roots)
            if not os.path.isfile(file_path):
                raise ModelFileError(f"{path}: the weights file {file} is missing")
            tensors = cls._read_pickle_meta(file_path) if pickled else cls._read_safetensors_meta(file_path)
            for name in listed.get(file, ()):
                if name not in tensors:
                    raise ModelFileError(f"{path}: {index} places tensor {name!r} in {file}, which does not hold it")
            for name, (shape, dtype) in tensors.items():
                if name in meta:
                    raise ModelFileError(f"{path}: tensor {name!r} is stored in both {meta[name][0]} and {file}")
                meta[name] = (file, shape, dtype)
            shards.append((file, list(tensors)))
        return cls(path, config, pickled, index, shards, meta)

    @staticmethod
    def _read_safetensors_meta(file_path: str) -> dict:
        """name -> (shape, dtype) in storage order, from the file's header alone (safetensors checks that the
        header's offsets tile the file, so a truncated file is refused here)."""
        try:
            with safe_open(file_path, framework="pt") as f:
                names = f.offset_keys() if hasattr(f, "offset_keys") else f.keys()  # (older versions: keys() only)
                slices = {name: f.get_slice(name) for name in names}
                meta = {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in slices.items()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises SafetensorError, OSError, ...
            raise ModelFileError(f"{file_path} has no readable safetensors header: {first_line(exc)}") from None
        for name, (shape, code) in meta.items():
            if code not in _DTYPES:
                raise UnsupportedModelError(f"{file_path}: tensor {name!r} has dtype {code}, which graphgrow "
                                            f"does not read")
        return {name: (shape, _DTYPES[code]) for name, (shape, code) in meta.items()}

    @staticmethod
    def _read_pickle_meta(file_path: str) -> dict:
        state = _load_pickle(file_path)
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ModelFileError(f"{file_path} is not a state dict of tensors")
        return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}

    def __getstate__(self):  # (sent to the writer's worker processes, which may run in another directory)
        return {**self.__dict__, "path": os.path.abspath(self.path), "_pickle_cache": (None, None)}

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def names(self) -> list:
        return [name for _, names in self.shards for name in names]

    def shape(self, name: str) -> tuple:
        return self._meta[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._meta[name][2]

    def nbytes(self, name: str) -> int:
        _, shape, dtype = self._meta[name]
        return math.prod(shape) * dtype.itemsize

    def shard_of(self, name: str) -> str:
        return self._meta[name][0]

    @property
    def total_bytes(self) -> int:
        return sum(self.nbytes(name) for name in self._meta)

    @property
    def largest_tensor_bytes(self) -> int:
        return max((self.nbytes(name) for name in self._meta), default=0)

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read from its file alone."""
        file = os.path.join(self.path, self.shard_of(name))
        if not self.pickled:
            with safe_open(file, framework="pt") as f:  # one open per tensor: see the module's docstring
                return f.get_tensor(name)
        # a pickled file is loaded whole (memory-mapped where torch can, so its touched pages are what stays
        # resident), and kept for the next tensor, which is most often in the same file
        if self._pickle_cache[0] != file:
            self._pickle_cache = (None, None)
            self._pickle_cache = (file, _load_pickle(file))
        return self._pickle_cache[1][name]

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first axis) of the tensor ``name``, reading only their bytes where the file allows."""
        if self.pickled:
            return self.get(name)[start:stop]
        with safe_open(os.path.join(self.path, self.shard_of(name)), framework="pt") as f:
            return f.get_slice(name)[start:stop]

    def other_files(self) -> list:
        """Paths (relative to the directory) of the files the writer copies unchanged: all but config.json,
        the index and weights in any format; files in subfolders too, but not in hidden ones (.git, .cache)."""
        roots, found = allowed_roots(self.path), []
        for folder, dirs, files in os.walk(self.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file in sorted(files):
                rel = os.path.relpath(os.path.join(folder, file), self.path)
                if rel != CONFIG and not _WEIGHT_FILE.fullmatch(file):
                    check_inside(self.path, rel, roots)
                    found.append(rel)
        return found


def _header(tensors: list) -> tuple:
    """The safetensors header (8-byte length + JSON) of a file holding ``tensors`` [(name, shape, dtype)], and
    each tensor's offset in the file.  Laid out as safetensors does: bigger elements first, then by name
    (every tensor is aligned to its element size), JSON padded with spaces to a multiple of 8 bytes."""
    entries, offsets, end = {"__metadata__": {"format": "pt"}}, {}, 0
    for name, shape, dtype in sorted(tensors, key=lambda t: (-t[2].itemsize, t[0])):
        size = math.prod(shape) * dtype.itemsize
        entries[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [end, end + size]}
        offsets[name], end = end, end + size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {name: start + offset for name, offset in offsets.items()}


def _announced(src: Checkpoint, plan) -> dict:
    """source name -> {new name: (shape, dtype)}, as plan.outputs says, checked for clashes and dtypes."""
    announced, origin = {}, {}
    for name in src.names():
        announced[name] = {}
        for new, shape, dtype in plan.outputs(name):
            if new in origin:
                raise RuntimeError(f"the plan makes tensor {new!r} from both {origin[new]!r} and {name!r}")
            if dtype not in _CODES:
                raise RuntimeError(f"the plan makes tensor {new!r} of dtype {dtype}, which safetensors cannot store")
            origin[new] = name
            announced[name][new] = (tuple(int(d) for d in shape), dtype)
    return announced


def check_output_dir(src: Checkpoint, out_dir, overwrite: bool) -> str:
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        raise InvalidArgumentError(f"output folder {parent} does not exist")
    real_out, real_src = os.path.realpath(out_dir), os.path.realpath(src.path)
    if _inside(real_out, real_src) or _inside(real_src, real_out):
        raise InvalidArgumentError(f"output directory {out_dir} is, contains or lies inside the checkpoint being "
                                   f"read ({src.path}); choose another")
    if os.path.lexists(out_dir):
        if os.path.islink(out_dir) or not os.path.isdir(out_dir):
            raise InvalidArgumentError(f"output path {out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not overwrite:
            raise InvalidArgumentError(f"output directory {out_dir} is not empty; pass --overwrite (overwrite=True) "
                                       f"to replace it")
    return out_dir


def move_into_place(tmp: str, out_dir: str) -> None:
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
        os.rmdir(out_dir)
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
        return
    old = tmp + "-old"  # (tmp's name is unique in the folder, so is this one)
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)  # the new checkpoint is in place: a leftover is no reason to fail


def _check_room(folder: str, sizes: list, src: Checkpoint, others: list) -> None:
    """Refuse before writing when the output's disk cannot hold the planned files (the old output, when
    replaced, stays until the new one is in place)."""
    need = sum(sizes) + sum(os.path.getsize(os.path.join(src.path, rel)) for rel in others) + (1 << 20)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if need > free:
        raise InvalidArgumentError(f"the disk of {folder} has {free / 2 ** 30:.2f} GiB free, and the grown "
                                   f"checkpoint needs {need / 2 ** 30:.2f} GiB; nothing written")


def rewrite_checkpoint(src: Checkpoint, out_dir, config: dict, plan, *, overwrite: bool = False,
                       progress=None, verify=None, workers: int | None = None, executor=None) -> str:
    """Write ``src`` transformed by ``plan`` as a new checkpoint directory ``out_dir`` (returned, absolute).

    ``plan.outputs(name)`` -> [(new name, shape, dtype)] says what each source tensor becomes, without data;
    ``plan.compute(name, tensor)`` -> {new name: tensor} computes it, once per source tensor; source tensors
    with the same ``plan.unit(name)`` (when the plan defines it) are computed one after the other, in storage
    order, by one task.  The layout is kept: one output file per source file, each new tensor in the file of the
    tensor it came from (pickled sources are written as safetensors), and an index when the source had one.
    Each file is created at its full size, header first (from the announced shapes), and each tensor's bytes
    written at its offset, so memory stays near the largest tensor and what the plan keeps.  ``config`` is
    written as config.json, :meth:`Checkpoint.other_files` are copied.

    ``workers``: processes writing the tensors (:mod:`.parallel`; 1: this process; None: the CPU count capped by
    memory and by the bytes written); ``executor``: "ray", a :class:`.parallel.RayWriter` or a
    ``concurrent.futures.Executor`` instead.  Then ``plan`` and ``src`` are pickled.  The bytes are the same.
    ``progress(done_bytes, total_bytes, name)`` is called here as tasks finish (after each source tensor when
    serial).  ``verify(folder)``, when given, is called on the complete output before it is moved into place;
    an exception there, or in any task, leaves nothing behind.  A ``verify`` that follows the writing has
    ``order_key(new name)`` (the order tensors are written in), ``follow(folder)`` (called once config.json,
    the index and every file's header are in place) and ``written(new names)`` (after each task).  Atomic:
    written into a temporary folder beside ``out_dir``, renamed into place."""
    chosen = parallel.writer(workers, executor)
    out_dir = check_output_dir(src, out_dir, overwrite)
    others = src.other_files()
    announced = _announced(src, plan)
    numbered = src.pickled and src.index is not None
    out_files = [f"model-{i + 1:05d}-of-{len(src.shards):05d}.safetensors" if numbered
                 else SAFE_WEIGHTS if src.pickled else file for i, (file, _) in enumerate(src.shards)]
    files = []  # (out file, header, {new: offset}, size)
    for (_, names), out_file in zip(src.shards, out_files):
        tensors = [(new, *spec) for name in names for new, spec in announced[name].items()]
        header, offsets = _header(tensors)
        files.append((out_file, header, offsets,
                      len(header) + sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in tensors)))
    _check_room(os.path.dirname(out_dir), [size for *_, size in files], src, others)
    units = parallel.units(src, plan)
    if chosen is None:
        n = parallel.default_workers(src, announced, units)
        chosen = parallel.SerialWriter() if n == 1 else parallel.PoolWriter(n)
    order_key = getattr(verify, "order_key", None)
    if order_key is not None:  # the order the check follows (bytes and offsets do not depend on it)
        units.sort(key=lambda u: min((order_key(new) for n in u for new in announced[n]), default=(0,)))
    tmp = tempfile.mkdtemp(prefix=".graphgrow-", dir=os.path.dirname(out_dir))
    try:
        places, weight_map = {}, {}
        for out_file, header, offsets, size in files:
            with open(os.path.join(tmp, out_file), "wb") as f:
                f.write(header)
                f.truncate(size)  # the tensors' bytes are written at their offsets, in any order
            places.update({new: (out_file, offset) for new, offset in offsets.items()})
            weight_map.update({new: out_file for new in offsets})
        if src.index is not None:
            sizes = {new: (math.prod(shape) * dtype.itemsize, math.prod(shape))
                     for specs in announced.values() for new, (shape, dtype) in specs.items()}
            index = {"metadata": {"total_parameters": sum(n for _, n in sizes.values()),
                                  "total_size": sum(b for b, _ in sizes.values())},
                     "weight_map": weight_map}
            with open(os.path.join(tmp, SAFE_INDEX), "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")  # as transformers writes it
        follow = getattr(verify, "follow", None)
        if follow is not None:  # the check reads each layer as soon as it is written (see layer_check)
            follow(tmp)
        job = parallel.WriteJob(src, plan, tmp, announced, places)
        done, total, written = 0, src.total_bytes, set()
        for nbytes, names in chosen.run(job, units):
            done += nbytes
            if progress is not None:
                progress(done, total, names[-1])
            if follow is not None:
                written.update(new for name in names for new in announced[name])
                verify.written(written)
        for out_file, *_ in files:  # on disk before the rename
            fd = os.open(os.path.join(tmp, out_file), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for rel in others:
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            shutil.copy2(os.path.join(src.path, rel), os.path.join(tmp, rel))
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp made it 0700; a new directory gets 0777 less the umask
        if verify is not None:  # the complete output, checked before anything is moved into place
            verify(tmp)
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
