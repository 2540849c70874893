#!/usr/bin/env python3
"""Medians of the interleaved runs that ab.sh wrote: one table row per case
(before, after, change), from the suite's own table lines."""
import re,statistics,sys
f,a_tag,b_tag=sys.argv[1:4]
txt=open(f).read().split('### ')
data={}
for block in txt[1:]:
    lines=block.strip().split('\n')
    tag=lines[0].split()[0]
    for l in lines[1:]:
        if not l.startswith('|'): continue
        cells=[c.strip() for c in l.strip('|').split('|')]
        case=cells[0]; val=cells[2]
        if len(cells) < 3:
            continue
        if 'µs' in cells[1]:
            m2=re.match(r'(\d+) / (\d+) / (\d+)',val)
            if not m2:
                continue
            v=(float(m2.group(1)),float(m2.group(2)))
        else:
            m=re.match(r'([\d.,]+) (M|K)?',val)
            if not m:
                continue
            v=float(m.group(1).replace(',',''))*{'M':1e6,'K':1e3,None:1}[m.group(2)]
        data.setdefault(case,{}).setdefault(tag,[]).append(v)
for case,d in data.items():
    a=d.get(a_tag); b=d.get(b_tag)
    if not a or not b:
        continue
    if isinstance(a[0],tuple):
        ma=statistics.median([x[0] for x in a]); mb=statistics.median([x[0] for x in b]); pa=statistics.median([x[1] for x in a]); pb=statistics.median([x[1] for x in b])
        print(f"| {case} | p50 {ma:.0f} µs ({min(x[0] for x in a):.0f}–{max(x[0] for x in a):.0f}), p99 {pa:.0f} | p50 {mb:.0f} µs ({min(x[0] for x in b):.0f}–{max(x[0] for x in b):.0f}), p99 {pb:.0f} | p50 {(mb/ma-1)*100:+.0f}%, p99 {(pb/pa-1)*100:+.0f}% (lower is better) |")
    else:
        ma=statistics.median(a); mb=statistics.median(b)
        fmt=lambda x: f"{x/1e6:.2f} M" if x>=1e6 else f"{x/1e3:.0f} K"
        print(f"| {case} | {fmt(ma)} ({fmt(min(a))}–{fmt(max(a))}) | {fmt(mb)} ({fmt(min(b))}–{fmt(max(b))}) | {(mb/ma-1)*100:+.0f}% |")
