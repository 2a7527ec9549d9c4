#!/usr/bin/env python3
"""Draw the risk-coverage curves that `nolad evaluate JOB --csv curves.csv` wrote, into a PNG.

    python reference/plot_risk_coverage.py curves.csv risk_coverage.png [--title TEXT]

The CSV has one row per signal and number of images kept: signal,kept,coverage,accuracy (docs/labels.md).
The plot shows, for every signal, the accuracy of the labels kept (y) against the fraction kept (x), with
the area under each curve in the legend. Pillow only (reference/requirements.txt), no plotting library.
"""
import argparse
import csv
import sys

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
WIDTH, HEIGHT = 900, 600
LEFT, RIGHT, TOP, BOTTOM = 80, 260, 50, 70


def read_curves(path):
    """{signal: [(coverage, accuracy), ...]} in file order."""
    curves = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"signal", "coverage", "accuracy"} - set(reader.fieldnames or [])
        if missing:
            sys.exit(f"{path}: not a `nolad evaluate --csv` file (no column {', '.join(sorted(missing))})")
        for row in reader:
            curves.setdefault(row["signal"], []).append((float(row["coverage"]), float(row["accuracy"])))
    if not curves:
        sys.exit(f"{path}: no curve points")
    return curves


def area(points):
    """Mean accuracy over the points (one per image kept), as `nolad evaluate` prints it."""
    return sum(a for _, a in points) / len(points)


def draw(curves, out, title):
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    d = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP
    # The accuracy axis starts at a round tenth below the lowest accuracy shown.
    lo = max(0.0, min(0.9, int(min(a for points in curves.values() for _, a in points) * 10) / 10))

    def px(coverage, accuracy):
        return (x0 + coverage * (x1 - x0), y0 - (accuracy - lo) / (1 - lo) * (y0 - y1))

    # Grid and axes.
    for i in range(11):
        c = i / 10
        x, _ = px(c, lo)
        d.line([(x, y0), (x, y1)], fill=(230, 230, 230))
        d.text((x - 8, y0 + 8), f"{c:.1f}", fill="black", font=font)
        a = lo + (1 - lo) * i / 10
        _, y = px(0, a)
        d.line([(x0, y), (x1, y)], fill=(230, 230, 230))
        d.text((x0 - 40, y - 6), f"{a:.2f}", fill="black", font=font)
    d.rectangle([x0, y1, x1, y0], outline="black")
    d.text(((x0 + x1) / 2 - 80, y0 + 30), "coverage (fraction of images kept)", fill="black", font=font)
    d.text((10, y1 - 18), "accuracy of the labels kept", fill="black", font=font)
    d.text((x0, 8), title, fill="black", font=font)

    # Curves, from (first coverage, accuracy) on; the legend at the right with each area.
    for k, (signal, points) in enumerate(curves.items()):
        colour = COLOURS[k % len(COLOURS)]
        d.line([px(c, a) for c, a in points], fill=colour, width=2)
        ly = y1 + 20 * k
        d.line([(x1 + 15, ly + 6), (x1 + 40, ly + 6)], fill=colour, width=3)
        d.text((x1 + 48, ly), f"{signal}  area {area(points):.4f}", fill="black", font=font)
    image.save(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="curve points from `nolad evaluate JOB --csv FILE`")
    parser.add_argument("png", help="where to write the plot")
    parser.add_argument("--title", default="risk-coverage of nolad's label signals")
    args = parser.parse_args()
    draw(read_curves(args.csv), args.png, args.title)


if __name__ == "__main__":
    main()
