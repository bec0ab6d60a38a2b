"""Command line: `python -m csm_multi say "Hello." -o hello.wav` (and friends).

Parses arguments, calls the core, prints results; errors become one readable line and exit code 2
(the traceback goes to the debug log: `--debug` shows it). Flag defaults come from the environment
variables the app reads too (settings.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .config import SamplingConfig
from .errors import CsmError
from .settings import engine_flags, setting

log = logging.getLogger("csm_multi.cli")


def _build(args):
    from .loaders import build_engine

    return build_engine(args.model, checkpoint=args.checkpoint, device=args.device, watermark=not args.no_watermark,
                        tokenizer_repo=args.tokenizer_repo, trust_tokenizer=args.trust_tokenizer,
                        quantize=args.quantize, prefix_cache_mb=args.prefix_cache_mb)


def cmd_say(args) -> int:
    from .audio import load_audio, save_audio
    from .frames import Segment

    from .script import clean_utterance

    text = clean_utterance(args.text)  # control characters and undecodable bytes of argv dropped
    if not text:
        raise CsmError("nothing to say: give the text to speak, e.g. say \"Hello there.\"")
    if args.speaker < 0:
        raise CsmError(f"--speaker must be 0 or more, got {args.speaker}")
    sampling = _checked(SamplingConfig, args, temperature="--temperature", topk="--topk", seed="--seed",
                        max_audio_length_ms=("--max-ms", args.max_ms))
    output = _output_file(args.output, (".wav", ".flac", ".mp3", ""))
    context = []  # inputs are checked before the model loads (csm-1b takes a while)
    for item in args.context or []:
        path, _, transcript = item.partition("=")
        if not transcript:
            raise CsmError(f"--context {item!r}: write it as PATH=TRANSCRIPT")
        context.append(Segment(speaker=args.speaker, text=clean_utterance(transcript), audio=load_audio(path)))
    engine = _build(args)
    t0 = time.perf_counter()
    utt = engine.generate(text, args.speaker, context, sampling)
    took = time.perf_counter() - t0
    out = save_audio(output, utt.audio)
    mark = "watermarked" if utt.watermarked else "NOT watermarked"
    print(f"{out}: {utt.duration_s:.2f} s of audio in {took:.1f} s, seed {utt.seed}, {mark}")
    return 0


def _checked(make, args, **flags):
    """`make(**fields)` from flag values, checked by the config's own validation before any model
    loads: a ValueError becomes one line naming the flag. `flags` maps a field to its flag, or to
    (flag, value) where the value is not the flag's own (converted units)."""
    given = {field: flag if isinstance(flag, tuple) else (flag, getattr(args, flag.lstrip("-").replace("-", "_")))
             for field, flag in flags.items()}
    try:
        return make(**{field: value for field, (_, value) in given.items()})
    except ValueError as e:
        for field, (flag, value) in given.items():  # which one: each alone, the others at their defaults
            try:
                make(**{field: value})
            except ValueError as alone:
                shown = getattr(args, flag.lstrip("-").replace("-", "_"), value)
                raise CsmError(f"{flag} {f'{shown:g}' if isinstance(shown, float) else shown}: {alone}") from e
        raise CsmError(str(e)) from e


def _render_config(**fields):
    """A RenderConfig whose sampling settings are checked too (SamplingConfig checks them per line)."""
    from .render import RenderConfig

    config = RenderConfig(**fields)
    config.sampling(0)
    return config


def _output_file(path: str, suffixes: tuple[str, ...] | None):
    """A file to write later: its folder is made now and it must not be a folder; `suffixes`, when
    given, are the endings allowed ("" for none). Checked before any model loads or generates."""
    out = Path(path)
    if suffixes is not None and out.suffix.lower() not in suffixes:
        raise CsmError(f"{path}: use a file name ending in {' or '.join(s for s in suffixes if s)}")
    if out.is_dir():
        raise CsmError(f"{path} is a folder: give a file name")
    _make_folder(out.parent)
    return out


def _make_folder(folder) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        import errno

        why = {errno.EEXIST: "a file of that name is in the way", errno.ENOTDIR: "a file is in the way on its path",
               errno.EACCES: "no permission to write there", errno.EROFS: "that place is read-only"}
        hint = why.get(e.errno, "choose a folder you can write to")
        raise CsmError(f"cannot make the folder {folder} ({e.strerror}): {hint}") from e
    if not folder.is_dir():
        raise CsmError(f"{folder} is a file, not a folder")


def default_store_dir() -> Path:
    """The CLI's voice library: the app's shared one (`--shared-library`) under CSM_PROFILES_DIR,
    else ~/.local/share/csm-multi/profiles, so every working directory sees the same voices."""
    from .studio import SHARED

    return setting("profiles_dir") / SHARED


def _store_dir(args) -> Path:
    return Path(args.profiles_dir) if args.profiles_dir is not None else default_store_dir()


def _store(args):
    from .profiles import ProfileStore

    folder = _store_dir(args)
    old = Path("profiles")  # the default before 2026-12: ./profiles
    if args.profiles_dir is None and old.resolve() != folder.resolve() and any(old.glob("*/profile.json")):
        print(f"note: voice profiles are kept in {folder}; ./profiles holds some too: "
              "use them with --profiles-dir profiles (or move them there)", file=sys.stderr)
    return ProfileStore(folder)


def _print_profile(p) -> None:
    print(f"{p.name:24} speaker {p.speaker_id}  {p.duration_s:5.1f} s  {p.transcript[:60]!r}")


def cmd_profiles(args) -> int:
    store = _store(args)
    action = args.action
    if action == "add":
        import shlex

        from .loaders import ASR_MODEL, build_transcriber
        from .studio import create_profile
        from .errors import TranscriptionError

        source = ASR_MODEL if args.asr_model is None else args.asr_model
        transcriber = None if args.transcript else build_transcriber(source)
        try:
            profile, transcribed = create_profile(store, args.name, args.audio, args.transcript, transcriber,
                                                  args.speaker_id)
        except TranscriptionError as e:  # its text is the page's ("Type what the clip says"): here, the flag
            e.args = (f"{str(e).rstrip('.')}: --transcript \"...\".", *e.args[1:])
            raise
        _print_profile(profile)
        if transcribed:
            print(f"transcribed automatically with {transcriber.name}: {profile.transcript!r}\n"
                  f"check it; fix it with: python -m csm_multi profiles transcript {shlex.quote(profile.name)} \"...\"")
    elif action == "list":
        profiles = store.list()
        for p in profiles:
            _print_profile(p)
        if not profiles:
            print(f"no profiles in {store.root}: add one with `python -m csm_multi profiles add NAME clip.wav --transcript ...`")
    elif action == "rename":
        _print_profile(store.rename(args.name, args.new_name))
    elif action == "transcript":
        _print_profile(store.update_transcript(args.name, args.text))
    elif action == "delete":
        name = store.get(args.name).name
        store.delete(name)
        print(f"deleted {name}")
    elif action == "export":
        if args.dest.endswith(("/", os.sep)):  # a folder to make
            _make_folder(Path(args.dest))
        print(store.export(args.name, args.dest))
    elif action == "import":
        _print_profile(store.import_file(args.file, args.name))
    return 0


def voices_for(lines, store, overrides: list[str] | None) -> dict[str, str | None]:
    """Script speaker -> profile: `--voice NAME=PROFILE|none` first, else the profile of the same name."""
    from .profiles import resolve_voices
    from .script import lines_label, speaker_key, speaker_lines, speakers

    given = {}
    for item in overrides or []:
        name, sep, profile = item.partition("=")
        if not sep or not name.strip():
            raise CsmError(f"--voice {item!r}: write it as SPEAKER=PROFILE (or SPEAKER=none)")
        given[name.strip()] = None if profile.strip().lower() in ("", "none") else profile.strip()
    cast = speakers(lines)
    strangers = [name for name in given if speaker_key(name) not in {speaker_key(n) for n in cast}]
    if strangers:  # a typo would otherwise leave that speaker on its default voice without a word
        raise CsmError(f"--voice {strangers[0]}=...: the script has no speaker {strangers[0]!r}; "
                       f"its speakers are {', '.join(cast)}")
    voices, missing = resolve_voices(store, cast, given,
                                     notice=lambda text: print(f"note: --voice: {text}", file=sys.stderr))
    if missing:
        where = speaker_lines(lines)
        listed = "; ".join(f"{n} ({lines_label(where[speaker_key(n)][1])})" for n in missing)
        raise CsmError(
            f"no voice profile for {listed}: add one with `profiles add NAME clip.wav --transcript ...`, "
            f"or map it with --voice {missing[0]}=PROFILE (or --voice {missing[0]}=none for no reference voice)")
    return voices


def cmd_render(args) -> int:
    from functools import partial

    from tqdm import tqdm

    from .memory import CudaMemoryManager
    from .render import ScriptRenderer
    from .script import parse_script

    try:
        text = Path(args.script).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CsmError(f"cannot read script {args.script}: it is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                       f"position {e.start}); save it as UTF-8 and try again") from e
    except OSError as e:
        raise CsmError(f"cannot read script {args.script}: {e.strerror or e}") from e
    lines = parse_script(text)
    config = _checked(_render_config, args, pause_ms="--pause-ms", temperature="--temperature", topk="--topk",
                      seed="--seed", max_line_ms=("--max-line-s", args.max_line_s * 1000), mode="--mode",
                      batch_size="--batch-size", end_padding=("--no-end-padding", not args.no_end_padding),
                      trim_silence=("--no-trim", not args.no_trim))
    store = _store(args)
    voices = voices_for(lines, store, args.voice)  # before loading the model or making folders: fail fast
    out = Path(args.output)
    if out.suffix and out.suffix.lower() not in (".wav", ".flac", ".mp3"):
        raise CsmError(f"-o {args.output}: the dialogue file must end in .wav, .flac or .mp3 (or name a folder)")
    folder, name = (out.parent, out.stem) if out.suffix else (out, "dialogue")
    _make_folder(folder)
    if args.project:
        _output_file(args.project, (".csmproj", ""))
    engine = _build(args)
    renderer = ScriptRenderer(engine, partial(store.segment, encoder=engine.encode_reference,
                                              encoder_id=engine.codec_id),
                              on_frame=CudaMemoryManager(engine.device))
    bar = tqdm(total=len(lines), unit="line", disable=args.quiet)

    def progress(p):
        bar.n = round(p.fraction * len(lines), 2)
        bar.set_postfix_str(f"{p.speaker}: frame {p.frame}", refresh=False)
        bar.refresh()  # one redraw per frame

    if config.mode == "fast":  # every line is a request to one continuous batch of --batch-size rows
        engine.serve(max_rows=max(1, config.batch_size))
    try:
        result = renderer.render(lines, voices, config, progress=progress)
    finally:
        engine.stop_serving()
    bar.close()
    paths = result.save(folder, name=name, formats=(out.suffix.lower().lstrip(".") or "wav",))
    print(f"{paths['dialogue']}: {result.audio.numel() / 24000:.2f} s, {len(result.clips)} line{'' if len(result.clips) == 1 else 's'}; "
          f"clips in {paths['dialogue'].parent / 'clips'}, manifest {paths['manifest']}")
    stats = store.stats()
    print(f"profile cache: {stats['hits']} hits, {stats['misses']} misses, {stats['encodes']} encodes")
    if args.project:
        from .project import save_project

        print(f"project: {save_project(args.project, text, voices, config, result, store=store)}")
    return 0


def cmd_project(args) -> int:
    """`project open FILE`: import a .csmproj's voices; print its mapping and settings; write its
    script (`--script-out`) and its rendering (`--output`)."""
    import shlex

    from .project import import_project, read_project

    checked = read_project(args.file)  # the archive first: a bad one leaves no folders behind
    if args.script_out and not args.force:  # a script is something people edit: never written over unasked
        target = Path(args.script_out)
        if target.is_file() and _text_or_none(target) != checked.script:
            raise CsmError(f"--script-out {args.script_out}: that file exists and holds another script; give a new "
                           "name, or add --force to write over it")
    if args.output and not args.force:
        folder = Path(args.output)
        if folder.is_dir() and any(folder.iterdir()):
            raise CsmError(f"-o {args.output}: that folder is not empty; give a new or empty folder, or add --force "
                           "to write the rendering into it (files of the same names are replaced)")
    if args.script_out:
        _output_file(args.script_out, None)
    if args.output:
        _make_folder(Path(args.output))
    project = import_project(checked, _store(args))
    for name in project.imported:
        print(f"imported voice {name}")
    for note in project.notes:
        print(f"note: {note}")
    c = project.config
    print(f"settings: seed {c.seed}, temperature {c.temperature}, top-k {c.topk}, max {c.max_line_ms / 1000:g} s/line, "
          f"pause {c.pause_ms} ms, mode {c.mode}")
    flags = " ".join("--voice " + shlex.quote(f"{k}={v or 'none'}") for k, v in project.voices.items())
    if _store_dir(args).resolve() != default_store_dir().resolve():  # the voices went into this library
        flags += " --profiles-dir " + shlex.quote(str(args.profiles_dir))
    if args.script_out:
        Path(args.script_out).write_text(project.script, encoding="utf-8")
        print(f"script: {args.script_out}; render it again with: render {args.script_out} {flags}")
    if args.output and project.result:
        paths = project.result.save(args.output)
        print(f"rendering: {paths['dialogue']} ({len(project.result.clips)} line{'' if len(project.result.clips) == 1 else 's'})")
    elif args.output:
        print("the project holds no rendering")
    return 0


def _text_or_none(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def cmd_info(args) -> int:
    engine = _build(args)
    for key, value in vars(engine.info).items():
        print(f"{key:10} {value}")
    return 0


STORE_HELP = ("the voice library (default: the app's shared library, CSM_PROFILES_DIR/shared, else "
              "~/.local/share/csm-multi/profiles/shared)")


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line too (argparse prints its whole usage first),
    naming where the help is. Its subcommands' parsers are of this class as well."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    prog = "csm-multi" if Path(sys.argv[0]).name == "csm-multi" else "python -m csm_multi"  # the console script
    parser = OneLineParser(prog=prog, description="Multi-speaker CSM-1B speech.")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true", help="on an error, also print its traceback")
    sub = parser.add_subparsers(dest="command", required=True)

    say = sub.add_parser("say", help="speak one line of text to a WAV file")
    say.add_argument("text")
    say.add_argument("-o", "--output", default="out.wav")
    say.add_argument("--speaker", type=int, default=0)
    say.add_argument("--context", action="append", metavar="PATH=TRANSCRIPT",
                     help="a reference clip of the same speaker and its transcript (repeatable)")
    say.add_argument("--temperature", type=float, default=0.9)
    say.add_argument("--topk", type=int, default=50)
    say.add_argument("--seed", type=int)
    say.add_argument("--max-ms", type=float, default=10_000)
    engine_flags(say)
    say.set_defaults(func=cmd_say)

    prof = sub.add_parser("profiles", help="manage voice profiles (reference clip + transcript)")
    prof.add_argument("--profiles-dir", help=STORE_HELP)
    psub = prof.add_subparsers(dest="action", required=True)
    add = psub.add_parser("add", help="create a profile from a WAV/FLAC/OGG/MP3 clip")
    add.add_argument("name")
    add.add_argument("audio")
    add.add_argument("--transcript", help="what the clip says, word for word (default: transcribed by --asr-model)")
    add.add_argument("--asr-model", default=setting("asr_model"),
                     help="Whisper model (hub id or local folder) for a missing --transcript; 'none' turns it off "
                          "(default: env CSM_ASR_MODEL, else Whisper base.en)")
    add.add_argument("--speaker-id", type=int)
    psub.add_parser("list", help="list the profiles")
    ren = psub.add_parser("rename", help="rename a profile")
    ren.add_argument("name")
    ren.add_argument("new_name")
    tr = psub.add_parser("transcript", help="replace a profile's transcript")
    tr.add_argument("name")
    tr.add_argument("text")
    rm = psub.add_parser("delete", help="delete a profile")
    rm.add_argument("name")
    ex = psub.add_parser("export", help="write one .csmvoice file")
    ex.add_argument("name")
    ex.add_argument("dest")
    im = psub.add_parser("import", help="read a .csmvoice file")
    im.add_argument("file")
    im.add_argument("--name")
    for action in psub.choices.values():  # also accepted after the action: `profiles list --profiles-dir X`
        action.add_argument("--profiles-dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    prof.set_defaults(func=cmd_profiles)

    ren = sub.add_parser("render", help="render a multi-speaker script (`Name: line` per line)")
    ren.add_argument("script")
    ren.add_argument("-o", "--output", default="dialogue.wav", help="dialogue file (clips and manifest beside it)")
    ren.add_argument("--voice", action="append", metavar="SPEAKER=PROFILE", help="map a speaker (repeatable)")
    ren.add_argument("--profiles-dir", help=STORE_HELP)
    ren.add_argument("--pause-ms", type=int, default=300)
    ren.add_argument("--temperature", type=float, default=0.9)
    ren.add_argument("--topk", type=int, default=50)
    ren.add_argument("--seed", type=int, help="line i uses seed + i (default: random, recorded in the manifest)")
    ren.add_argument("--max-line-s", type=float, default=10.0)
    ren.add_argument("--mode", choices=["conversational", "fast"], default="conversational",
                     help="fast: lines conditioned on profiles only, generated in batches")
    ren.add_argument("--batch-size", type=int, default=4)
    ren.add_argument("--no-end-padding", action="store_true",
                     help="send lines as written (default: a full stop and a short pause are added, then trimmed)")
    ren.add_argument("--no-trim", action="store_true", help="keep the silence after each line")
    ren.add_argument("--project", metavar="FILE.csmproj",
                     help="also write a project: script, voices (with their audio), settings, rendering")
    ren.add_argument("-q", "--quiet", action="store_true")
    engine_flags(ren)
    ren.set_defaults(func=cmd_render)

    proj = sub.add_parser("project", help="open a .csmproj project file")
    proj.add_argument("--profiles-dir", help=STORE_HELP)
    projsub = proj.add_subparsers(dest="action", required=True)
    popen = projsub.add_parser("open", help="import its voices into --profiles-dir (reused or renamed on clashes)")
    popen.add_argument("file")
    popen.add_argument("--script-out", help="write the project's script here (not over another file, unless --force)")
    popen.add_argument("-o", "--output", help="write its rendering (dialogue, clips, manifest) into this folder "
                       "(new or empty, unless --force)")
    popen.add_argument("--force", action="store_true",
                       help="write over an existing --script-out file and into a folder that is not empty")
    proj.set_defaults(func=cmd_project)

    info = sub.add_parser("info", help="load the model and print what was loaded")
    engine_flags(info)
    info.set_defaults(func=cmd_info)
    for command in (say, ren, info, *psub.choices.values(), *projsub.choices.values()):  # also after the command
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if "--debug" in argv:  # read before parsing: the parser's defaults can fail too (CSM_TRUST_TOKENIZER=maybe)
        logging.getLogger("csm_multi").setLevel(logging.DEBUG)
    try:
        args = build_parser().parse_args(argv)
        if args.verbose:
            logging.getLogger().setLevel(logging.INFO)
        clean_temp_dir()
        return args.func(args)
    except (CsmError, ValueError) as e:
        hint = getattr(e, "operator_hint", "")
        return _fail(f"{e} ({hint})" if hint else str(e), e)
    except OSError as e:  # a file or folder the command was pointed at (checked up front where possible)
        where = f" ({e.filename})" if e.filename else ""
        return _fail(f"{e.strerror or e}{where}", e)


def _fail(message: str, error: BaseException) -> int:
    """One line on stderr and exit code 2; the traceback goes to the debug log (shown with --debug)."""
    log.debug("the command failed", exc_info=error)
    print(f"error: {message}", file=sys.stderr)
    return 2


def clean_temp_dir() -> None:
    """At start-up: drop torch's import-time temp folder of this process, sweep those of killed ones."""
    from .tempdirs import release_torch_scratch, sweep

    release_torch_scratch()
    sweep()
