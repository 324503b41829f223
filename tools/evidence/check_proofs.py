#!/usr/bin/env python3
"""Check pgtrail's Merkle tree roots, proofs and signed checkpoints in Python alone
(hashlib, base64 and the `cryptography` package), written from the formats the README gives:
RFC 6962 hashing, RFC 9162 proof verification, C2SP signed-note and tlog-checkpoint with
Ed25519 keys in Go's note text forms.

Input on stdin, as tools/evidence/tlogcheck (Go) reads it, one item a line, hex unless said:
  leaf DATA             the next leaf's bytes
  root N HASH           the root of the first N leaves
  inclusion N I P1,P2   the proof that leaf I is in the tree of N leaves
  consistency M N P1,   the proof that the tree of M leaves is a prefix of the tree of N
  vkey KEY              the verifier key of the checkpoints that follow
  checkpoint NOTE       a signed checkpoint, the note in base64

Prints "ok: R roots, I inclusion proofs, C consistency proofs, K checkpoints" and exits 0, or
"FAIL: ..." for the first item that does not check and exits 1.

    check_proofs.py --proof FILE --key VKEY

checks a proof file of `pgtrail prove` (C2SP tlog-proof: the leaf's bytes, its index, the
inclusion proof and the signed checkpoint) and prints "ok: leaf I of N, kind K, lsn L, seq S".

    check_proofs.py --consistency FILE --old OLD_CHECKPOINT --new NEW_CHECKPOINT --key VKEY

checks a proof file of `pgtrail prove --consistency-from` (pgtrail.dev/consistency-proof@v1:
the two sizes, then the RFC 6962 consistency proof's hashes in base64) between two signed
checkpoints, and prints "ok: the tree of M leaves is a prefix of the tree of N".
"""
import base64
import hashlib
import sys

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


def fail(message):
    print("FAIL: " + message)
    sys.exit(1)


def leaf_hash(data):
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def mth(leaves):
    """RFC 6962 section 2.1: the root of hashed leaves."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(mth(leaves[:k]), mth(leaves[k:]))


def verify_inclusion(index, size, leaf, proof, root):
    """RFC 9162 section 2.1.3.2."""
    if index >= size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(first, second, first_root, second_root, proof):
    """RFC 9162 section 2.1.4.2 (the empty tree is a prefix of every tree)."""
    if first > second:
        return False
    if first == 0:
        return not proof
    if first == second:
        return not proof and first_root == second_root
    if not proof:
        return False
    if first & (first - 1) == 0:
        proof = [first_root] + proof
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0


def parse_vkey(text):
    """Go's note verifier key: name+ID+base64(0x01 || Ed25519 public key)."""
    name, key_id, key = text.split("+", 2)
    raw = base64.b64decode(key, validate=True)
    if len(raw) != 33 or raw[0] != 1:
        fail("not an Ed25519 verifier key: " + text)
    expected = hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    if bytes.fromhex(key_id) != expected:
        fail("the verifier key's ID does not match its name and key: " + text)
    return name, expected, Ed25519PublicKey.from_public_bytes(raw[1:])


def open_note(note, vkey):
    """C2SP signed-note: the text when a signature line of the key verifies over it."""
    name, key_id, public = vkey
    split = note.rfind("\n\n")
    if split < 0 or not note.endswith("\n"):
        fail("not a signed note: %r" % note)
    text, signatures = note[: split + 1], note[split + 2 :]
    for line in signatures.splitlines():
        if not line.startswith("\u2014 "):
            fail("not a signature line: %r" % line)
        signer, signature = line[2:].split(" ", 1)
        signature = base64.b64decode(signature, validate=True)
        if signer != name or len(signature) != 68 or signature[:4] != key_id:
            continue
        try:
            public.verify(signature[4:], text.encode())
            return text
        except InvalidSignature:
            continue
    return None


def check_proof_file(path, vkey_text):
    """A C2SP tlog-proof file: extra (the leaf's bytes), index, the inclusion proof's hashes, a
    blank line, and the signed checkpoint; the leaf must be in the tree the checkpoint pins."""
    with open(path) as f:
        text = f.read()
    head, _, note = text.partition("\n\n")
    lines = head.split("\n")
    if not lines or lines[0] != "c2sp.org/tlog-proof@v1":
        fail("not a c2sp.org/tlog-proof@v1 file")
    extra, index, hashes = None, None, []
    for line in lines[1:]:
        if line.startswith("extra "):
            extra = base64.b64decode(line[6:], validate=True)
        elif line.startswith("index "):
            index = int(line[6:])
        else:
            hashes.append(base64.b64decode(line, validate=True))
    if extra is None or index is None:
        fail("the proof has no extra or no index line")
    vkey = parse_vkey(vkey_text)
    body = open_note(note, vkey)
    if body is None:
        fail("the proof's checkpoint has no valid signature by %s" % vkey[0])
    origin, size, root = body[:-1].split("\n")
    if origin != vkey[0]:
        fail("the checkpoint's origin is not the key's name")
    if not verify_inclusion(index, int(size), leaf_hash(extra), hashes, base64.b64decode(root)):
        fail("the leaf is not at index %d of the tree of %s leaves" % (index, size))
    print("ok: leaf %d of %s, kind %d, lsn %d, seq %d" % (
        index, size, extra[16], int.from_bytes(extra[17:25], "big"), int.from_bytes(extra[25:29], "big")))


def signed_checkpoint(path, vkey):
    """(size, root) of a checkpoint note signed by vkey."""
    with open(path) as f:
        body = open_note(f.read(), vkey)
    if body is None:
        fail("%s has no valid signature by %s" % (path, vkey[0]))
    lines = body[:-1].split("\n")
    if len(lines) != 3 or lines[0] != vkey[0]:
        fail("%s is not a checkpoint of origin %s" % (path, vkey[0]))
    return int(lines[1]), base64.b64decode(lines[2], validate=True)


def check_consistency_file(path, old_path, new_path, vkey_text):
    vkey = parse_vkey(vkey_text)
    (m, old_root), (n, new_root) = signed_checkpoint(old_path, vkey), signed_checkpoint(new_path, vkey)
    with open(path) as f:
        lines = f.read().split("\n")
    if lines[0] != "pgtrail.dev/consistency-proof@v1":
        fail("not a pgtrail.dev/consistency-proof@v1 file")
    if lines[1].split() != [str(m), str(n)]:
        fail("the proof is between sizes %s, the checkpoints are of %d and %d" % (lines[1], m, n))
    hashes = [base64.b64decode(h, validate=True) for h in lines[2:] if h]
    if not verify_consistency(m, n, old_root, new_root, hashes):
        fail("the tree of %d leaves is not a prefix of the tree of %d" % (m, n))
    print("ok: the tree of %d leaves is a prefix of the tree of %d" % (m, n))


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--proof" and sys.argv[3] == "--key":
        check_proof_file(sys.argv[2], sys.argv[4])
        return
    if len(sys.argv) == 9 and sys.argv[1::2] == ["--consistency", "--old", "--new", "--key"]:
        check_consistency_file(sys.argv[2], sys.argv[4], sys.argv[6], sys.argv[8])
        return
    leaves, counts, vkey = [], [0, 0, 0, 0], None

    def root_of(n):
        if n > len(leaves):
            fail("a tree of %d leaves, only %d given" % (n, len(leaves)))
        return mth(leaves[:n])

    for line in sys.stdin:
        f = line.split()
        if not f:
            continue
        kind = f[0]
        hashes = [bytes.fromhex(h) for h in f[3].split(",") if h] if len(f) == 4 else []
        if kind == "leaf" and len(f) <= 2:
            leaves.append(leaf_hash(bytes.fromhex(f[1]) if len(f) == 2 else b""))
        elif kind == "root" and len(f) == 3:
            n = int(f[1])
            if root_of(n) != bytes.fromhex(f[2]):
                fail("the root of %d leaves differs" % n)
            counts[0] += 1
        elif kind == "inclusion" and len(f) in (3, 4):
            n, i = int(f[1]), int(f[2])
            if not verify_inclusion(i, n, leaves[i], hashes, root_of(n)):
                fail("inclusion of leaf %d in %d" % (i, n))
            counts[1] += 1
        elif kind == "consistency" and len(f) in (3, 4):
            m, n = int(f[1]), int(f[2])
            if not verify_consistency(m, n, root_of(m), root_of(n), hashes):
                fail("consistency of %d with %d" % (m, n))
            counts[2] += 1
        elif kind == "vkey" and len(f) == 2:
            vkey = parse_vkey(f[1])
        elif kind == "checkpoint" and len(f) == 2 and vkey:
            note = base64.b64decode(f[1], validate=True).decode()
            text = open_note(note, vkey)
            if text is None:
                fail("checkpoint %r: no valid signature by %s" % (note, vkey[0]))
            lines = text[:-1].split("\n")
            if len(lines) != 3 or lines[0] != vkey[0]:
                fail("checkpoint text %r" % text)
            size, root = int(lines[1]), base64.b64decode(lines[2], validate=True)
            if root_of(size) != root:
                fail("the checkpoint of %d leaves signs another root than the leaves give" % size)
            counts[3] += 1
        else:
            fail("cannot read the line %r" % line)
    print("ok: %d roots, %d inclusion proofs, %d consistency proofs, %d checkpoints" % tuple(counts))


if __name__ == "__main__":
    main()
