"""The command line of ``bgm``."""

from __future__ import annotations

import argparse

from bgm import vocab
from gateway.cli import commands


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bgm", description="Score a video with new background music that "
                                "follows the emotion of what is said.")
    sub = p.add_subparsers(dest="command", required=True)

    def job_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("input", help="video (or audio) file")
        sp.add_argument("--gateway", metavar="HOST:PORT", help="use a running gateway instead of in-process services")
        sp.add_argument("--token", help="bearer token for the gateway (default: $BGM_TOKEN)")
        sp.add_argument("--tls-ca", metavar="PEM", help="talk TLS to the gateway, trusting this CA")
        sp.add_argument("--tls-cert", metavar="PEM", help="client certificate, for mutual TLS")
        sp.add_argument("--tls-key", metavar="PEM", help="client certificate's key, for mutual TLS")
        sp.add_argument("--translate", action="store_true", help="translate non-English speech to English first")
        sp.add_argument("--language", help="spoken language (ISO 639-1); detected when omitted")
        sp.add_argument("--min-span", type=float, help="shortest emotion span in seconds (default 5)")
        sp.add_argument("--srt", metavar="FILE", help="write subtitles (SubRip)")
        sp.add_argument("--vtt", metavar="FILE", help="write subtitles (WebVTT)")
        sp.add_argument("--timeline", metavar="FILE", help="write the emotion timeline and transcript as JSON")
        sp.add_argument("--plot", metavar="FILE", help="write a picture of the emotion timeline over the waveform")
        sp.add_argument("--plot-format", choices=["png", "svg"],
                        help="picture format of --plot (default: from its extension, else png)")
        sp.add_argument("--timeline-in", metavar="FILE",
                        help="use this (edited) timeline instead of transcribing and classifying: the JSON "
                             "that --timeline or --project writes; unchanged spans keep their music")
        sp.add_argument("--project", metavar="DIR",
                        help="keep the work (decoded audio, separated speech, rendered spans, the timeline) "
                             "in DIR so a re-render of an edited DIR/timeline.json takes seconds; "
                             "'bgm clean DIR' removes it")
        sp.add_argument("--timeout", type=float, default=6 * 3600, help="overall deadline in seconds")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress output")

    remix = sub.add_parser("remix", help="replace a video's music with new music that follows its emotions")
    job_args(remix)
    remix.add_argument("-o", "--output", help="output file (default: INPUT.remixed.EXT)")
    remix.add_argument("--music-backend", choices=list(vocab.MUSIC_BACKENDS))
    remix.add_argument("--seed", type=int, help="music seed: the same seed gives the same music")
    remix.add_argument("--tempo", type=float, help="force one tempo (BPM)")
    remix.add_argument("--style", choices=list(vocab.MUSIC_STYLES),
                       help="instruments and groove for the whole video, over each emotion's own harmony and "
                            "tempo (the composer; an edited timeline's span style wins)")
    remix.add_argument("--intensity", type=float, metavar="0..1",
                       help="how much the music does (density, dynamics, drums) for the whole video "
                            "(default: each emotion's own)")
    remix.add_argument("--duck-db", type=float,
                       help="how far the music's speech band (200 Hz-9 kHz) dips under speech (dB, default 18)")
    remix.add_argument("--duck-wide-db", type=float,
                       help="how far the rest of the music (bass, air) dips under speech (dB, default 12; "
                            "set it to --duck-db for a plain full-band duck)")
    remix.add_argument("--duck-sensitivity", type=float, metavar="0..1",
                       help="how readily the music ducks for what may be speech (default 0.5; higher ducks "
                            "for softer speech)")
    remix.add_argument("--loudness", type=float, help="loudness target in LUFS (default -14)")
    remix.add_argument("--separation", choices=list(vocab.SEPARATION_BACKENDS), help="speech separation backend")
    remix.add_argument("--stems", metavar="DIR", help="also write speech, bgm and mix WAV stems here")
    remix.set_defaults(func=commands.remix)

    analyze = sub.add_parser("analyze", help="transcript and emotion timeline only (JSON on stdout)")
    job_args(analyze)
    analyze.set_defaults(func=commands.analyze)

    clean = sub.add_parser("clean", help="remove a project folder that --project made")
    clean.add_argument("project", metavar="DIR")
    clean.set_defaults(func=commands.clean)

    example = sub.add_parser("example", help="make the example video (colour bars, speech, a music bed)")
    example.add_argument("output", nargs="?", default="demo.mp4")
    example.add_argument("--section", type=float, default=10.0, help="seconds per emotion section")
    example.set_defaults(func=commands.example)

    serve = sub.add_parser("serve", help="run a service (port from BGM_<SERVICE>_PORT)")
    serve.add_argument("service", choices=[*(s.name for s in vocab.SERVICES), commands.ALL_SERVICES])
    serve.set_defaults(func=commands.serve)
    return p
