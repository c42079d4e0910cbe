#!/usr/bin/env python3
"""A TCP relay that counts bytes: `countproxy.py LISTEN_PORT TARGET_PORT STATS_PORT`.

Relays 127.0.0.1:LISTEN_PORT to 127.0.0.1:TARGET_PORT. A connection to STATS_PORT gets
"UP DOWN\\n": the bytes clients sent so far, and the bytes they received.
"""
import asyncio
import sys

listen, target, stats = (int(a) for a in sys.argv[1:4])
counts = {"up": 0, "down": 0}


async def pump(reader, writer, key):
    try:
        while data := await reader.read(256 * 1024):
            counts[key] += len(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def relay(creader, cwriter):
    try:
        sreader, swriter = await asyncio.open_connection("127.0.0.1", target)
    except OSError:
        cwriter.close()
        return
    await asyncio.gather(pump(creader, swriter, "up"), pump(sreader, cwriter, "down"))


async def report(_reader, writer):
    writer.write(f"{counts['up']} {counts['down']}\n".encode())
    await writer.drain()
    writer.close()


async def main():
    a = await asyncio.start_server(relay, "127.0.0.1", listen)
    b = await asyncio.start_server(report, "127.0.0.1", stats)
    async with a, b:
        await asyncio.gather(a.serve_forever(), b.serve_forever())


asyncio.run(main())
