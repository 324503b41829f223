#!/usr/bin/env python3
"""Verify a pgtrail archive without pgtrail: recompute every leaf (leaf format v1) from the
segments with pyarrow, the RFC 6962 tree and its root, and check the archive's signed
checkpoints and any kept outside it. Or check an auditor bundle (`pgtrail bundle`): its rows'
leaves, the range's root against the signed checkpoint, and that no change of its scope is
withheld. Written from the README's Evidence section alone (hashlib, pyarrow and the
`cryptography` package).

    verify_archive.py ARCHIVE [--key VKEY]... [--trusted-checkpoint FILE]...
    verify_archive.py --bundle DIR [--key VKEY]...
    verify_archive.py --bundle DIR --certificate FILE --key VKEY...

Prints "ok: N segments, R changes, tree of L leaves, root B64, K checkpoints verified" (for a
bundle "ok: bundle of C changes in scope, ...", for a certificate "ok: certificate: ...") and
exits 0, or "FAIL: PLACE: WHAT" for each problem and exits 1. A certificate is checked
against a bundle of its scope: its signature, then each line of its statement against what
the bundle proves.
"""
import base64
import bisect
import decimal
import hashlib
import json
import math
import os
import struct
import sys

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_proofs import node_hash, open_note, parse_vkey  # noqa: E402

decimal.getcontext().prec = 80

LEAF_DOMAIN = b"pgtrail/leaf/v1\n"
BODY_DOMAIN = b"pgtrail/body/v1\n"
PART_DOMAIN = b"pgtrail/part/v1\n"
SCHEMA_DOMAIN = b"pgtrail/schema/v1\n"
OPS = {"insert": 1, "update": 2, "delete": 3, "truncate": 4, "snapshot": 5}

problems = []


def problem(place, what):
    problems.append("%s: %s" % (place, what))


def u32(n):
    return struct.pack(">I", n)


def sstr(s):
    b = s.encode("utf-8")
    return u32(len(b)) + b


def sbytes(b):
    return u32(len(b)) + b


def sha(*parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def schema_digest(rel):
    b = SCHEMA_DOMAIN + u32(rel["relation_id"]) + sstr(rel["schema"]) + sstr(rel["name"])
    b += bytes([rel["replica_identity"]]) + u32(len(rel["columns"]))
    for c in rel["columns"]:
        b += sstr(c["name"]) + u32(c["type_oid"]) + struct.pack(">i", c["type_modifier"])
        b += bytes([1 if c["is_key"] else 0])
    b += u32(len(rel["primary_key"]))
    for k in rel["primary_key"]:
        b += sstr(k)
    return sha(b)


def salts(seed, lsn, seq):
    tail = struct.pack(">QI", lsn, seq)
    a = sha(seed, tail, b"\x00")
    b = sha(seed, tail, b"\x01")
    return [a[:16], a[16:], b[:16], b[16:]]


def part(k, salt, data):
    return sha(PART_DOMAIN, bytes([k]), salt, data)


def plain_values(array):
    """A column's values as Python values whose bytes the format defines."""
    t = array.type
    if pa.types.is_dictionary(t):
        return plain_values(array.dictionary_decode())
    if pa.types.is_date32(t):
        return array.cast(pa.int32()).to_pylist()
    if pa.types.is_time64(t) or pa.types.is_timestamp(t):
        return array.cast(pa.int64()).to_pylist()
    return array.to_pylist()


def value_bytes(t, v):
    """The typed bytes of one non-null value of Arrow type t."""
    if pa.types.is_boolean(t):
        return b"\x01" if v else b"\x00"
    if pa.types.is_int16(t):
        return struct.pack(">h", v)
    if pa.types.is_int32(t) or pa.types.is_date32(t):
        return struct.pack(">i", v)
    if pa.types.is_int64(t) or pa.types.is_time64(t) or pa.types.is_timestamp(t):
        return struct.pack(">q", v)
    if pa.types.is_float32(t):
        return b"\x7f\xc0\x00\x00" if math.isnan(v) else struct.pack(">f", v)
    if pa.types.is_float64(t):
        return b"\x7f\xf8" + b"\x00" * 6 if math.isnan(v) else struct.pack(">d", v)
    if pa.types.is_decimal(t):
        unscaled = int(v.scaleb(t.scale))
        return unscaled.to_bytes(16, "big", signed=True)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return sstr(v)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return sbytes(v)
    if pa.types.is_fixed_size_binary(t):
        return bytes(v)
    if pa.types.is_struct(t):  # an interval
        return struct.pack(">iiq", v["months"], v["days"], v["microseconds"])
    if pa.types.is_list(t):
        et = t.value_type
        out = u32(len(v))
        for e in v:
            out += b"\x00" if e is None else b"\x02" + value_bytes(et, e)
        return out
    if pa.types.is_dictionary(t):
        return value_bytes(t.value_type, v)
    raise ValueError("no leaf encoding for type %s" % t)


def list_values(array, child_type):
    """A List column's cells with temporal elements as integers."""
    out = []
    for cell in array:
        if not cell.is_valid:
            out.append(None)
            continue
        values = cell.values
        if pa.types.is_date32(child_type):
            values = values.cast(pa.int32())
        elif pa.types.is_time64(child_type) or pa.types.is_timestamp(child_type):
            values = values.cast(pa.int64())
        elif pa.types.is_dictionary(child_type):
            values = values.dictionary_decode()
        out.append(values.to_pylist())
    return out


def column_cells(array):
    """(type, python values) of an image's column, ready for value_bytes."""
    t = array.type
    if pa.types.is_list(t):
        return t, list_values(array, t.value_type)
    return t, plain_values(array)


def image_bytes(rel, image, unknown, text, row):
    """u8 present, then per column 0x00 null, 0x01 unknown, 0x02 typed, 0x03 exact text."""
    unknown = unknown[row] or []
    text_entries = text[row] or []
    texts = {}
    for k, v in text_entries:
        if k in texts:
            raise ValueError("the exact texts name column %s twice" % k)
        texts[k] = v
    present = image is not None and image["valid"][row]
    if not present:
        if unknown or texts:
            raise ValueError("an absent row image has unknown columns or exact texts")
        return b"\x00"
    names = [c["name"] for c in rel["columns"]]
    for n in list(unknown) + list(texts):
        if n not in names:
            raise ValueError("column %s is named in a row image but the table has no such column" % n)
    out = b"\x01"
    for name, (t, values) in zip(names, image["columns"]):
        v = values[row]
        is_unknown, has_text = name in unknown, name in texts
        if (is_unknown or has_text) and v is not None:
            raise ValueError("column %s has a typed value and is also unknown or exact text" % name)
        if is_unknown and has_text:
            raise ValueError("column %s is both unknown and exact text" % name)
        if is_unknown:
            out += b"\x01"
        elif has_text:
            out += b"\x03" + (b"\x00" if texts[name] is None else b"\x01" + sstr(texts[name]))
        elif v is None:
            out += b"\x00"
        else:
            out += b"\x02" + value_bytes(t, v)
    return out


def header(kind, lsn, seq, xid, at):
    return LEAF_DOMAIN + bytes([kind]) + struct.pack(">QIIq", lsn, seq, xid, at)


def image_of(table, name):
    if name not in table.column_names:
        return None
    col = table.column(name).combine_chunks()
    return {
        "valid": [col.is_valid().to_pylist()][0] if False else col.is_valid().to_pylist(),
        "columns": [column_cells(f) for f in col.flatten()],
    }


def epoch_salts(epochs, sealed=None):
    """The salts of a change from its epoch's seed (None before the first epoch); in a sealed
    epoch (its seed erased by a redaction: seed None), the salts recorded for the change (zero
    salts when none are: its leaf then cannot match)."""
    sealed = sealed or {}

    starts = [(e[0], e[1]) for e in epochs]

    def of(lsn, seq):
        i = bisect.bisect_right(starts, (lsn, seq))
        if i == 0:
            return None
        seed = epochs[i - 1][2]
        if seed is None:
            return sealed.get((lsn, seq), [bytes(16)] * 4)
        return salts(seed, lsn, seq)
    return of


def read_sealed(evidence, tree):
    """The recorded salts of every sealed epoch's changes: {(lsn, seq): [salt0..salt3]}."""
    sealed = {}
    for e in tree["epochs"]:
        if e.get("seed") is None:
            with open(os.path.join(evidence, e["salts"]), "rb") as f:
                data = f.read()
            for at in range(0, len(data), 76):
                lsn, seq = struct.unpack(">QI", data[at:at + 12])
                raw = data[at + 12:at + 76]
                sealed[(lsn, seq)] = [raw[0:16], raw[16:32], raw[32:48], raw[48:64]]
    return sealed


def read_redactions(evidence, tree):
    """The redaction records: in the file tree.json's "redactions" names, one JSON object a
    line (format v2), or inline as a list (v1)."""
    named = tree.get("redactions", [])
    if not isinstance(named, str):
        return named
    with open(os.path.join(evidence, named)) as f:
        return [json.loads(line) for line in f if line.strip()]


def segment_leaves(path, salts_of, erased_of=lambda lsn, seq: {}):
    """[(lsn, seq, leaf hash)] of the rows salts_of gives salts for, and the number of rows.
    erased_of gives a redacted change's erased parts' digests ({part: digest}): the leaf keeps
    them, the row no longer holds the values."""
    pf = pq.ParquetFile(path)
    meta = pf.metadata.metadata or {}
    description = json.loads(meta[b"pgtrail.segment"])
    content = description["content"]
    table = pf.read()
    lsn = table.column("lsn").to_pylist()
    seq = table.column("seq").to_pylist()
    xid = table.column("xid").to_pylist()
    at = table.column("committed_at").cast(pa.int64()).to_pylist()
    leaves = []
    for i in range(1, len(lsn)):
        if (lsn[i - 1], seq[i - 1]) >= (lsn[i], seq[i]):
            raise ValueError("rows out of (lsn, seq) order or repeated at %d/%d" % (lsn[i], seq[i]))
    if content == "Messages":
        transactional = table.column("transactional").to_pylist()
        prefix = plain_values(table.column("prefix").combine_chunks())
        body = plain_values(table.column("content").combine_chunks())
        text = plain_values(table.column("content_text").combine_chunks())
        for r in range(len(lsn)):
            s = salts_of(lsn[r], seq[r])
            if s is None:
                continue
            try:
                derived = body[r].decode("utf-8")
            except UnicodeDecodeError:
                derived = None
            erased = erased_of(lsn[r], seq[r])
            # A content a redaction erased is neither (its digest is the record's).
            if derived != text[r] and 0 not in erased:
                raise ValueError("change %d/%d: content_text differs from the content" % (lsn[r], seq[r]))
            digest = sha(BODY_DOMAIN, erased[0] if 0 in erased else part(0, s[0], sbytes(body[r])))
            data = header(2, lsn[r], seq[r], xid[r], at[r])
            data += bytes([1 if transactional[r] else 0]) + sstr(prefix[r]) + digest
            leaves.append((lsn[r], seq[r], sha(b"\x00", data)))
        return leaves, len(lsn)
    rel = content["Table"]
    sd = schema_digest(rel)
    op = plain_values(table.column("op").combine_chunks())
    context = plain_values(table.column("context").combine_chunks())
    changed = table.column("changed").to_pylist()
    images = {}
    for name in ("before", "after"):
        images[name] = (
            image_of(table, name),
            table.column(name + "_unknown").to_pylist(),
            table.column(name + "_text").to_pylist(),
        )
    for r in range(len(lsn)):
        s = salts_of(lsn[r], seq[r])
        if s is None:
            continue
        erased = erased_of(lsn[r], seq[r])
        digests = []
        try:
            for k in range(4):
                if k in erased:
                    digests.append(erased[k])
                    continue
                if k == 0:
                    data = b"\x00" if context[r] is None else b"\x01" + sstr(context[r])
                elif k in (1, 2):
                    data = image_bytes(rel, *images["before" if k == 1 else "after"], r)
                elif changed[r] is None:
                    data = b"\x00"
                else:
                    data = b"\x01" + u32(len(changed[r])) + b"".join(sstr(n) for n in changed[r])
                digests.append(part(k, s[k], data))
        except ValueError as e:
            raise ValueError("change %d/%d: %s" % (lsn[r], seq[r], e))
        digest = sha(BODY_DOMAIN, *digests)
        if op[r] not in OPS:
            raise ValueError("change %d/%d: unknown op %r" % (lsn[r], seq[r], op[r]))
        data = header(1, lsn[r], seq[r], xid[r], at[r])
        data += sstr(rel["schema"]) + sstr(rel["name"]) + sd + bytes([OPS[op[r]]]) + digest
        leaves.append((lsn[r], seq[r], sha(b"\x00", data)))
    return leaves, len(lsn)


class Frontier:
    def __init__(self):
        self.size, self.edge = 0, []

    def push(self, leaf):
        node, size = leaf, self.size
        while size & 1:
            node = node_hash(self.edge.pop(), node)
            size >>= 1
        self.edge.append(node)
        self.size += 1

    def root(self):
        if not self.edge:
            return hashlib.sha256(b"").digest()
        r = self.edge[-1]
        for left in reversed(self.edge[:-1]):
            r = node_hash(left, r)
        return r


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_checkpoint(place, note, vkeys, trusted):
    """(origin, size, root, verified) or None (a problem was recorded)."""
    for vkey in vkeys:
        text = open_note(note, vkey)
        if text is not None:
            lines = text[:-1].split("\n")
            if len(lines) != 3 or lines[0] != vkey[0]:
                problem(place, "not a checkpoint of origin %s" % vkey[0])
                return None
            return lines[0], int(lines[1]), base64.b64decode(lines[2], validate=True), True
    if vkeys:
        problem(place, "no given key verifies its signature")
        return None
    if trusted:
        problem(place, "a trusted checkpoint needs a --key that verifies it")
        return None
    split = note.rfind("\n\n")
    lines = note[:split].split("\n")
    return lines[0], int(lines[1]), base64.b64decode(lines[2], validate=True), False


def parse_lsn(text):
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def leaf_head(data):
    """(kind, lsn, seq, schema.table or None, payload or None) of a leaf_data, or None."""
    if not data.startswith(LEAF_DOMAIN) or len(data) < len(LEAF_DOMAIN) + 13:
        return None
    at = len(LEAF_DOMAIN)
    kind = data[at]
    lsn, seq = struct.unpack(">QI", data[at + 1:at + 13])
    at += 13

    def string(at):
        (n,) = struct.unpack(">I", data[at:at + 4])
        return data[at + 4:at + 4 + n].decode("utf-8"), at + 4 + n
    try:
        if kind == 1:
            schema, at = string(at + 12)
            table, _ = string(at)
            return kind, lsn, seq, schema + "." + table, None
        if kind == 2:
            return kind, lsn, seq, None, None
        payload, _ = string(at + 4)
        return kind, lsn, seq, None, payload
    except (struct.error, UnicodeDecodeError):
        return None


def root_from_range(size, first, hashes, proof):
    """The root of the tree of `size` leaves from the range's leaf hashes and its proof
    (README: Auditor bundles), or None when they do not fit together."""
    lo, hi = first, first + len(hashes)
    leaves, others = iter(hashes), iter(proof)

    def node(at, n):
        if at + n <= lo or at >= hi:
            return next(others)
        if n == 1:
            return next(leaves)
        k = 1 << ((n - 1).bit_length() - 1)
        return node_hash(node(at, k), node(at + k, n - k))
    if not hashes or hi > size:
        return None
    try:
        root = node(0, size)
    except StopIteration:
        return None
    if next(leaves, None) is not None or next(others, None) is not None:
        return None
    return root


def verify_bundle(bundle, vkeys):
    with open(os.path.join(bundle, "bundle.json")) as f:
        d = json.load(f)
    if d.get("format") != "pgtrail-bundle/v1":
        problem("bundle.json", "format %r is not pgtrail-bundle/v1" % d.get("format"))
        return None
    with open(os.path.join(bundle, "checkpoint")) as f:
        c = read_checkpoint("checkpoint", f.read(), vkeys, False)
    if c is None:
        return None
    origin, size, root, verified = c
    if size != d["tree_size"]:
        problem("checkpoint", "attests %d leaves, the range proof is for %d" % (size, d["tree_size"]))
        return None
    with open(os.path.join(bundle, "leaves.jsonl")) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    hashes, heads, wanted = [None] * len(entries), [None] * len(entries), {}
    for i, e in enumerate(entries):
        if "leaf_data" in e:
            data = base64.b64decode(e["leaf_data"], validate=True)
            hashes[i] = sha(b"\x00", data)
            heads[i] = leaf_head(data)
            if heads[i] is None:
                problem("leaf %d of the tree" % (d["first"] + i), "leaf_data is not a pgtrail leaf")
        else:
            raw = bytes.fromhex(e["salts"])
            s = [raw[0:16], raw[16:32], raw[32:48], raw[48:64]]
            erased = {int(k): bytes.fromhex(d) for k, d in e.get("erased", {}).items()}
            wanted.setdefault(e["file"], {})[(parse_lsn(e["lsn"]), e["seq"])] = (i, e["row"], s, erased)
    for fi, f in enumerate(d["files"]):
        path = os.path.join(bundle, f["file"])
        if file_sha256(path) != f["sha256"]:
            problem(f["file"], "its SHA-256 differs from bundle.json's")
            continue
        want = wanted.get(fi, {})
        meta = pq.ParquetFile(path).metadata.metadata or {}
        content = json.loads(meta[b"pgtrail.segment"])["content"]
        table = None if content == "Messages" else content["Table"]["schema"] + "." + content["Table"]["name"]
        try:
            got, n = segment_leaves(path, lambda l, s: want.get((l, s), (None, None, None, {}))[2],
                                    lambda l, s: want.get((l, s), (None, None, None, {}))[3])
        except (ValueError, KeyError, OSError, pa.ArrowException) as e:
            problem(f["file"], str(e))
            continue
        if len(got) != n or n != f["rows"]:
            problem(f["file"], "holds %d rows, %d named by the leaves, bundle.json lists %d" % (n, len(got), f["rows"]))
        for r, (l, s, h) in enumerate(got):
            i, row, _, _ = want[(l, s)]
            if row != r:
                problem(f["file"], "change %d/%d is row %d, its leaf names row %d" % (l, s, r, row))
            hashes[i] = h
            heads[i] = (1 if table else 2, l, s, table, None)
    for i, h in enumerate(hashes):
        if h is None:
            problem("leaf %d of the tree" % (d["first"] + i), "its row is missing from the bundle's files")
    if problems:
        return None
    scope = d["scope"]
    lo = None if scope["from"] is None else parse_lsn(scope["from"])
    hi = None if scope["to"] is None else parse_lsn(scope["to"])
    tables = scope["tables"]
    keys, held, last, gaps = [], 0, None, []
    for i, (head, e) in enumerate(zip(heads, entries)):
        kind, lsn, seq, table, payload = head
        if kind == 3:
            gaps.append(payload)
        if kind not in (1, 2):
            continue
        if last is not None and last >= (lsn, seq):
            problem("leaf %d of the tree" % (d["first"] + i), "changes out of key order")
        last = (lsn, seq)
        keys.append(lsn)
        in_range = (lo is None or lsn >= lo) and (hi is None or lsn <= hi)
        due = in_range and ((kind == 1 and (not tables or table in tables)) or (kind == 2 and not tables))
        if due and "leaf_data" in e:
            problem("leaf %d of the tree" % (d["first"] + i), "change %d/%d is in the scope but the bundle withholds its row" % (lsn, seq))
        if due and "leaf_data" not in e:
            held += 1
    at_start, at_end = d["first"] == 0, d["first"] + d["count"] == size
    if keys and lo is not None and keys[0] >= lo and not at_start:
        problem("the range's start", "its first change is inside the scope")
    if keys and hi is not None and keys[-1] <= hi and not at_end:
        problem("the range's end", "its last change is inside the scope")
    proof = [base64.b64decode(h, validate=True) for h in d["range_proof"]]
    if root_from_range(size, d["first"], hashes, proof) != root:
        problem("the range", "its leaves and proof do not give the checkpoint's root")
    # Complete through --to, unless the range reaches the tree's end before it: then through
    # the last change the checkpoint attests.
    through = hi if hi is not None and (not at_end or (keys and keys[-1] > hi)) else (keys[-1] if keys else None)
    return {"held": held, "origin": origin, "size": size, "root": root, "verified": verified,
            "gaps": gaps, "tables": tables, "from": lo, "through": through}


def lsn_text(lsn):
    return "%X/%X" % (lsn >> 32, lsn & 0xFFFFFFFF)


def verify_certificate(path, bundle, vkeys):
    """The statement of the certificate at `path` (README: `pgtrail certify`) when its
    signature verifies and the bundle proves each of its lines; otherwise None and problems."""
    with open(path) as f:
        note = f.read()
    text = None
    for vkey in vkeys:
        text = open_note(note, vkey)
        if text is not None:
            name = vkey[0]
            break
    if text is None:
        problem("the certificate", "no given --key verifies its signature")
        return None
    lines = text[:-1].split("\n")
    fields = ["origin", "tree", "tables", "from", "through", "changes"]
    if (len(lines) < 7 or lines[0] != "pgtrail.dev/coverage@v1"
            or any(not lines[1 + i].startswith(f + " ") for i, f in enumerate(fields))
            or any(not line.startswith("gap ") for line in lines[7:])):
        problem("the certificate", "not a pgtrail.dev/coverage@v1 statement")
        return None
    stated = {f: lines[1 + i][len(f) + 1:] for i, f in enumerate(fields)}
    stated["gaps"] = [line[4:] for line in lines[7:]]
    if stated["origin"] != name:
        problem("the certificate", "its origin is not the signing key's name")
    found = verify_bundle(bundle, vkeys)
    if found is None:
        return None
    size, root = stated["tree"].split(" ", 1)
    lsn_or = lambda text, none: None if text == none else parse_lsn(text)  # noqa: E731
    compared = [
        ("origin", stated["origin"], found["origin"]),
        ("tree", (int(size), root), (found["size"], base64.b64encode(found["root"]).decode())),
        ("tables", [] if stated["tables"] == "*" else stated["tables"].split(","), found["tables"]),
        ("from", lsn_or(stated["from"], "start"), found["from"]),
        ("through", lsn_or(stated["through"], "none"), found["through"]),
        ("changes", int(stated["changes"]), found["held"]),
        ("gaps", stated["gaps"], found["gaps"]),
    ]
    for field, said, proved in compared:
        if said != proved:
            problem("the certificate's " + field, "states %r, the bundle proves %r" % (said, proved))
    return stated


def main():
    args = sys.argv[1:]
    if not args:
        print(__doc__)
        sys.exit(2)
    archive, bundle, certificate, vkeys, trusted = args[0], None, None, [], []
    i = 1
    if args[0] == "--bundle" and len(args) > 1:
        archive, bundle, i = None, args[1], 2
    while i < len(args):
        if args[i] == "--key":
            vkeys.append(parse_vkey(args[i + 1]))
        elif args[i] == "--trusted-checkpoint":
            trusted.append(args[i + 1])
        elif args[i] == "--certificate" and bundle is not None:
            certificate = args[i + 1]
        else:
            print("unknown argument %s" % args[i])
            sys.exit(2)
        i += 2
    if certificate is not None:
        if not vkeys:
            print("a certificate is only as good as its signature: give --key")
            sys.exit(2)
        stated = verify_certificate(certificate, bundle, vkeys)
        if problems:
            for p in problems:
                print("FAIL: " + p)
            sys.exit(1)
        print("ok: certificate: %s changes of %s from %s through %s, %d gaps, tree %s of %s"
              % (stated["changes"], stated["tables"], stated["from"], stated["through"],
                 len(stated["gaps"]), stated["tree"].split(" ")[0], stated["origin"]))
        return
    if bundle is not None:
        result = verify_bundle(bundle, vkeys)
        if problems:
            for p in problems:
                print("FAIL: " + p)
            sys.exit(1)
        print("ok: bundle of %d changes in scope, tree of %d leaves, root %s, checkpoint %s, %d gaps"
              % (result["held"], result["size"], base64.b64encode(result["root"]).decode(),
                 "verified" if result["verified"] else "NOT checked", len(result["gaps"])))
        return
    evidence = os.path.join(archive, "evidence")
    with open(os.path.join(evidence, "tree.json")) as f:
        tree = json.load(f)
    with open(os.path.join(evidence, "manifest.json")) as f:
        manifest = json.load(f)
    epochs = sorted(((e["lsn"], e["seq"], None if e.get("seed") is None else bytes.fromhex(e["seed"]))
                     for e in tree["epochs"]), key=lambda e: (e[0], e[1]))
    sealed = read_sealed(evidence, tree)
    records = read_redactions(evidence, tree)
    redactions = {(r["lsn"], r["seq"]): {int(k): bytes.fromhex(d) for k, d in r["parts"].items()}
                  for r in records}
    leaves, rows, owner, redacted_table = [], 0, {}, {}
    segments = sorted(manifest["segments"], key=lambda s: (s["min"], s["file"]))
    for seg in segments:
        path = os.path.join(archive, "segments", seg["file"])
        place = "segment " + seg["file"]
        if not os.path.exists(path):
            problem(place, "listed in the manifest but missing")
            continue
        if file_sha256(path) != seg["sha256"]:
            problem(place, "its SHA-256 differs from the manifest's")
            continue
        try:
            got, n = segment_leaves(path, epoch_salts(epochs, sealed), lambda l, q: redactions.get((l, q), {}))
        except (ValueError, KeyError, OSError, pa.ArrowException) as e:
            problem(place, str(e))
            continue
        content = json.loads((pq.ParquetFile(path).metadata.metadata or {})[b"pgtrail.segment"])["content"]
        # Messages are in a hold's scope only when it takes every table: "" is no table's name.
        seg_table = "" if content == "Messages" else content["Table"]["schema"] + "." + content["Table"]["name"]
        for (l, s, _) in got:
            if (l, s) in redactions:
                redacted_table[(l, s)] = seg_table
        if n != seg["rows"]:
            problem(place, "holds %d rows, the manifest lists %d" % (n, seg["rows"]))
        rows += n
        for (l, s, h) in got:
            if (l, s) < tuple(seg["min"]) or (l, s) > tuple(seg["max"]):
                problem(place, "change %d/%d is outside its listed key range" % (l, s))
            if (l, s) in owner:
                problem("change %d/%d" % (l, s), "held twice, by %s and %s" % (owner[(l, s)], seg["file"]))
            owner[(l, s)] = seg["file"]
        leaves.extend(got)
    leaves.sort()
    # The tree: each epoch's changes (by key), then its events (gaps, the watermark; by n).
    starts = [(l, s) for (l, s, _) in epochs]
    events = sorted((e["lsn"], e["seq"], e["n"], e["kind"], e["payload"]) for e in tree.get("events", []))
    system = None
    for ev in events:
        place = "evidence event %d of epoch %d/%d" % (ev[2], ev[0], ev[1])
        if (ev[0], ev[1]) not in starts:
            problem("evidence/tree.json", "event %d of epoch %d/%d belongs to no epoch" % (ev[2], ev[0], ev[1]))
        try:
            payload = json.loads(ev[4])
        except ValueError:
            problem(place, "its payload is not JSON")
            continue
        if ev[3] == 4:
            # Every watermark names the source system of the first (another archive's spliced
            # in would not).
            if system is None:
                system = payload.get("system_id", "")
            elif payload.get("system_id", "") != system:
                problem(place, "its source system %s differs from the earlier watermarks' (%s)"
                        % (payload.get("system_id"), system))
        elif ev[3] not in (3, 5, 6, 7, 8):
            problem(place, "unknown event kind %d" % ev[3])
    # Every erasure is on the signed record, outside every legal hold over it: the latest
    # erasure of each redacted change has a receipt of its own (kind 5, bearing the record's
    # time), or a purge's (kind 8) for its table before its position; without one after a
    # later compaction's watermark, it was kept off the record. No receipt of it may come
    # while a hold covering it is in force: placed before the receipt's leaf and not yet
    # released there, and the erasure's time between the hold's placing and its release.
    own, purges, last_run, holds, released = {}, [], None, [[]], {}
    for ev in events:
        try:
            payload = json.loads(ev[4])
        except ValueError:
            continue
        in_force = len(holds) - 1
        if ev[3] == 5:
            own.setdefault(payload.get("change"), []).append((payload.get("at_us"), in_force))
        elif ev[3] == 8:
            purges.append((payload.get("tables") or [], parse_lsn(payload.get("before", "0/0")),
                           payload.get("at_us"), in_force))
        elif ev[3] in (6, 7) and isinstance(payload, dict):
            if ev[3] == 7 and isinstance((payload.get("released") or {}).get("at_us"), int):
                released[payload.get("id")] = payload["released"]["at_us"]
            now = [h for h in holds[-1] if h.get("id") != payload.get("id")]
            if ev[3] == 6:
                now.append(payload)
            holds.append(now)
        elif ev[3] == 4 and isinstance(payload.get("at_us"), int):
            last_run = payload["at_us"] if last_run is None else max(last_run, payload["at_us"])

    def held_at(at_us, in_force, lsn, table):
        for h in holds[in_force]:
            scope = h.get("scope") or {}
            lo, hi = scope.get("from"), scope.get("to")
            # The release's time, when the tree has it (later, perhaps: receipts an older
            # pgtrail made became leaves before the run's holds).
            until = released.get(h.get("id"))
            if ((not scope.get("tables") or table in scope["tables"])
                    and (lo is None or lsn >= parse_lsn(lo)) and (hi is None or lsn <= parse_lsn(hi))
                    and isinstance(at_us, int) and h.get("placed_at_us", 0) <= at_us
                    and (until is None or at_us < until)):
                return h
        return None

    for r in records:
        key = (r["lsn"], r["seq"])
        name = "%s#%d" % (lsn_text(r["lsn"]), r["seq"])
        table = redacted_table.get(key)
        if table is None:
            continue
        place = "change %s of %s" % (name, table) if table else "message %s" % name
        for at_us, in_force in own.get(name, []):
            h = held_at(at_us, in_force, r["lsn"], table)
            if h is not None:
                problem(place, "erased while legal hold %s (%s) was in force over it" % (h.get("id"), h.get("reason")))
        if any(at_us == r.get("at_us") for at_us, _ in own.get(name, [])):
            continue
        over = [p for p in purges if r["lsn"] < p[1] and table in p[0]]
        before = [p for p in over if isinstance(p[2], int) and p[2] <= r.get("at_us", 0)]
        if over:
            purge = before[-1] if before else over[0]
            h = held_at(r.get("at_us"), purge[3], r["lsn"], table)
            if h is not None:
                problem(place, "purged while legal hold %s (%s) was in force over it" % (h.get("id"), h.get("reason")))
            continue
        if last_run is not None and r.get("at_us", 0) < last_run:
            problem(place, "erased again with no receipt of that erasure in the tree" if name in own
                    else "its values were erased but no receipt in the tree records it")
    order, c, e = [], 0, 0
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else None
        while c < len(leaves) and (leaves[c][0], leaves[c][1]) >= start and (end is None or (leaves[c][0], leaves[c][1]) < end):
            order.append(leaves[c][2])
            c += 1
        while e < len(events) and (events[e][0], events[e][1]) == start:
            lsn, seq, n, kind, payload = events[e]
            order.append(sha(b"\x00", LEAF_DOMAIN, bytes([kind]), struct.pack(">QII", lsn, seq, n), sstr(payload)))
            e += 1
    checkpoints = []
    cdir = os.path.join(evidence, "checkpoints")
    if os.path.isdir(cdir):
        for name in sorted(os.listdir(cdir)):
            if not name.startswith("."):
                with open(os.path.join(cdir, name)) as f:
                    checkpoints.append((os.path.join(cdir, name), f.read(), False))
    for path in trusted:
        with open(path) as f:
            checkpoints.append((path, f.read(), True))
    wanted = []
    for place, note, is_trusted in checkpoints:
        c = read_checkpoint(place, note, vkeys, is_trusted)
        if c is None:
            continue
        if c[1] > len(order):
            problem(place, "attests %d changes but the tree holds %d: rolled back or truncated" % (c[1], len(order)))
            continue
        wanted.append((place, c))
    roots = {}
    sizes = {c[1] for _, c in wanted}
    frontier = Frontier()
    if 0 in sizes:
        roots[0] = frontier.root()
    for h in order:
        frontier.push(h)
        if frontier.size in sizes:
            roots[frontier.size] = frontier.root()
    verified = 0
    for place, (origin, size, root, ok) in wanted:
        if roots.get(size) != root:
            problem(place, "its root differs from the root of the first %d changes" % size)
        elif ok:
            verified += 1
    root = frontier.root()
    if (frontier.size, base64.b64encode(root).decode()) != (tree["size"], tree["root"]):
        problem("evidence/tree.json", "records %d leaves with root %s, the segments give %d with root %s"
                % (tree["size"], tree["root"], frontier.size, base64.b64encode(root).decode()))
    if problems:
        for p in problems:
            print("FAIL: " + p)
        sys.exit(1)
    print("ok: %d segments, %d changes, tree of %d leaves, root %s, %d checkpoints verified"
          % (len(segments), rows, frontier.size, base64.b64encode(root).decode(), verified))


if __name__ == "__main__":
    main()
