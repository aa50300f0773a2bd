"""Where a zstd stream stops decoding: the frame and block zstd refuses, with their byte range.

A streaming decoder that fails says only that it failed, after whatever it had been handed (a
1 MiB read, a whole shard). `locate_damage` reads the stream again, frame by frame and block by
block (RFC 8878: a frame header, then blocks each led by a 3-byte header giving last-block flag,
type and size, then an optional 4-byte content checksum), and hands one block at a time to a fresh
decoder, so the failure is pinned to the block whose bytes made zstd raise:

- a block zstd refuses: the damage is in that block's bytes, or in an earlier block of the same
  frame whose damage still decoded (into wrong bytes) and derailed this one;
- a content checksum that does not match: every block decoded, so the damage is somewhere in that
  frame; the checksum covers the whole frame and cannot say where;
- a block header or frame start that makes no sense: the damage is there or, for a frame start,
  in the previous frame's last block size.

Frames written without a checksum decode many flips into valid but wrong bytes, which nothing here
can see: slimpack writes its shards with checksums, and hashes whole files besides (index.json).
Only for the error path: it reads the whole stream once more.
"""

from __future__ import annotations

from typing import BinaryIO

import zstandard

_FRAME_MAGIC = 0xFD2FB528
_SKIPPABLE = range(0x184D2A50, 0x184D2A60)
_DICT_ID_BYTES = (0, 1, 2, 4)
_CONTENT_SIZE_BYTES = (0, 2, 4, 8)  # by Frame_Content_Size_flag; flag 0 is 1 byte when single-segment


def locate_damage(f: BinaryIO) -> str | None:
    """A phrase saying where a zstd stream read from ``f`` fails to decode, or None if it decodes.

    For example ``frame 0, block 3 (compressed bytes 196,610-262,148): Corrupted block detected;
    the damage is in this block, or in an earlier block of the frame that still decoded``.
    """
    pos, frame = 0, 0

    def read(n: int) -> bytes:
        nonlocal pos
        data = f.read(n)
        pos += len(data)
        return data

    while True:
        frame_start = pos
        magic_bytes = read(4)
        if not magic_bytes:
            return None
        if len(magic_bytes) < 4:
            return f"the stream ends inside the header of frame {frame} (byte {frame_start:,})"
        magic = int.from_bytes(magic_bytes, "little")
        if magic in _SKIPPABLE:
            size = int.from_bytes(read(4), "little")
            read(size)
            continue
        if magic != _FRAME_MAGIC:
            return (f"no zstd frame starts at byte {frame_start:,}, where frame {frame} should: the damage "
                    "is there or in the size of the previous frame's last block")
        descriptor = read(1)
        if not descriptor:
            return f"the stream ends inside the header of frame {frame} (byte {frame_start:,})"
        d = descriptor[0]
        single_segment, has_checksum = d >> 5 & 1, d >> 2 & 1
        content_size = _CONTENT_SIZE_BYTES[d >> 6] or single_segment
        header = magic_bytes + descriptor + read((not single_segment) + _DICT_ID_BYTES[d & 3] + content_size)
        decoder = zstandard.ZstdDecompressor().decompressobj()
        try:
            decoder.decompress(header)
        except zstandard.ZstdError as err:
            return f"the header of frame {frame} (compressed bytes {frame_start:,}-{pos - 1:,}) is invalid ({err})"
        block = 0
        while True:
            block_start = pos
            head = read(3)
            if len(head) < 3:
                return (f"the stream ends inside frame {frame} before its last block (byte {pos:,}): "
                        "the file is truncated, or a block header was damaged")
            value = int.from_bytes(head, "little")
            last, kind, size = value & 1, value >> 1 & 3, value >> 3
            if kind == 3:
                return (f"frame {frame}, block {block} has a reserved block type in its header at bytes "
                        f"{block_start:,}-{block_start + 2:,}: the damage is there")
            body = read(1 if kind == 1 else size)  # an RLE block stores its one byte
            where = f"frame {frame}, block {block} (compressed bytes {block_start:,}-{pos - 1:,})"
            try:
                decoder.decompress(head + body)
            except zstandard.ZstdError as err:
                return (f"{where}: {err}; the damage is in this block, or in an earlier block of the frame "
                        "that still decoded")
            if len(body) < (1 if kind == 1 else size):
                return f"{where}: the stream ends inside this block (truncated)"
            block += 1
            if last:
                break
        if has_checksum:
            checksum_start = pos
            checksum = read(4)
            if len(checksum) < 4:
                return f"the stream ends inside frame {frame}'s content checksum (truncated at byte {pos:,})"
            try:
                decoder.decompress(checksum)
            except zstandard.ZstdError as err:
                return (f"frame {frame}'s content checksum (compressed bytes {checksum_start:,}-{pos - 1:,}) "
                        f"does not match ({err}): every block decoded, so the damage is somewhere in "
                        f"compressed bytes {frame_start:,}-{pos - 1:,}; the checksum covers the whole frame "
                        "and cannot say where")
        frame += 1
