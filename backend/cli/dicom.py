"""``semiseg pacs list | pull | push`` and ``semiseg accept-seg``: DICOM-SEG and a DICOMweb PACS.

``semiseg init`` passes :func:`backend.dicom.sidecar_hook` (the source sidecar of DICOM series);
``semiseg export --format dicom-seg`` is parsed in
:mod:`backend.cli.engine` and calls :func:`backend.dicom.seg.export_seg`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from backend.errors import InputError


def _client(args: argparse.Namespace):
    from backend.dicom.pacs import client_from_env

    return client_from_env(args.url, user=args.user, timeout=args.timeout)


def cmd_pacs_list(args: argparse.Namespace) -> int:
    from backend.dicom.pacs import list_series

    rows = list_series(_client(args), args.url, modality=args.modality, patient=args.patient)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print("patient  modality  series#  instances  series UID  description  references")
    for r in rows:
        print(f"{r['PatientID']}  {r['Modality']}  {r['SeriesNumber']}  {r['NumberOfSeriesRelatedInstances']}  "
              f"{r['SeriesInstanceUID']}  {r['SeriesDescription'] or '-'}  {' '.join(r.get('references', [])) or '-'}")
    return 0


def cmd_pacs_pull(args: argparse.Namespace) -> int:
    from backend.dicom.pacs import SEG_MODALITY, list_series, pull

    pacs = _client(args)
    series = list(args.series or [])
    if args.all:
        series += [r["SeriesInstanceUID"] for r in list_series(pacs, args.url, patient=args.patient)
                   if r["Modality"] != SEG_MODALITY and r["SeriesInstanceUID"] not in series]
    if not series:
        raise InputError(args.url, "name the series to pull (--series UID ...) or --all")
    project, cases = pull(pacs, args.url, args.project, series, labels_json=args.labels_json,
                          modality=args.modality)
    if args.json:
        print(json.dumps({"project": str(project.root), "cases": cases}))
        return 0
    for case, uid in cases.items():
        print(f"{case}: series {uid}")
    print(f"{project.root}: {len(project.case_ids())} cases, {len(project.labeled_cases())} labeled")
    return 0


def cmd_pacs_push(args: argparse.Namespace) -> int:
    from backend.dicom.pacs import push
    from backend.project import Project

    stored = push(_client(args), args.url, Project.open(args.project), cases=args.cases or None, source=args.source,
                  run=args.run, seg_type=args.seg_type)
    for case, uid in stored:
        print(f"{case}: SEG {uid} stored")
    return 0


def cmd_accept_seg(args: argparse.Namespace) -> int:
    from backend.dicom.seg import accept_seg
    from backend.project import Project

    project = Project.open(args.project)
    record = accept_seg(project, args.case, args.seg_file)
    print(f"{args.case}: accepted from {args.seg_file} ({record['voxels_changed']} voxels changed); "
          f"{len(project.labeled_cases())} labeled cases")
    return 0


def _pacs_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")
    p.add_argument("--user", help="HTTP basic auth user (default $SEMISEG_PACS_USER; password from "
                                  "$SEMISEG_PACS_PASSWORD); without a user, a bearer token from $SEMISEG_PACS_TOKEN")
    p.add_argument("--timeout", type=float, default=60, help="seconds per request (default %(default)s)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pacs", help="a DICOMweb PACS: list series, pull them into a project, push DICOM-SEGs back")
    pacs = p.add_subparsers(dest="pacs_command", required=True, metavar="list|pull|push")

    q = pacs.add_parser("list", help="the series on the PACS (a SEG shows the series it references)")
    _pacs_options(q)
    q.add_argument("--modality", help="only this modality (CT, MR, SEG, ...)")
    q.add_argument("--patient", help="only this Patient ID")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_pacs_list)

    q = pacs.add_parser("pull", help="retrieve series into PROJECT (created when missing), one case per series; "
                                     "a series already there is not retrieved again")
    q.add_argument("project", type=Path)
    _pacs_options(q)
    q.add_argument("--series", nargs="+", help="Series Instance UIDs to pull")
    q.add_argument("--all", action="store_true", help="every image series (of --patient)")
    q.add_argument("--patient", help="with --all: only this Patient ID")
    q.add_argument("--json", action="store_true", help='print {"project": ..., "cases": {case: series UID}}')
    q.add_argument("--labels-json", type=Path, help='label names for a new project, e.g. {"background": 0, "liver": 1}')
    q.add_argument("--modality", choices=["MR", "CT", "other"], help="intensity normalisation of a new project")
    q.set_defaults(func=cmd_pacs_pull)

    q = pacs.add_parser("push", help="store a DICOM-SEG of each labeled DICOM-imported case on the PACS")
    q.add_argument("project", type=Path)
    _pacs_options(q)
    q.add_argument("--cases", nargs="+", help="only these cases (default: every DICOM-imported case of --source)")
    q.add_argument("--source", default="labels", help="'labels' (accepted labels) or a method's pseudo labels")
    q.add_argument("--run", help="the method's inference run (default: the latest)")
    q.add_argument("--seg-type", choices=["binary", "labelmap"], default="binary")
    q.set_defaults(func=cmd_pacs_push)

    p = sub.add_parser("accept-seg", help="accept a DICOM-SEG file as a DICOM-imported case's label")
    p.add_argument("project", type=Path)
    p.add_argument("case")
    p.add_argument("seg_file", type=Path)
    p.set_defaults(func=cmd_accept_seg)
