"""Draws samples/demo.jpg, the picture `make demo` asks about: a house with a red roof, a tree
and the sun on a summer day. Made by this script for this repo; public domain."""

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter


def draw() -> Image.Image:
    w, h = 640, 427
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    for y in range(h):  # sky gradient, then grass
        t = y / h
        d.line([(0, y), (w, y)], fill=(int(110 + 90 * t), int(170 + 60 * t), 235) if y < 290 else (70, int(150 - 40 * t), 60))
    d.ellipse([500, 40, 580, 120], fill=(255, 220, 90))  # sun
    d.rectangle([180, 190, 380, 330], fill=(235, 225, 200), outline=(90, 80, 70), width=3)  # house
    d.polygon([(160, 195), (280, 110), (400, 195)], fill=(180, 40, 35))  # roof
    d.rectangle([260, 260, 300, 330], fill=(110, 70, 40))  # door
    for x in (200, 320):
        d.rectangle([x, 215, x + 40, 250], fill=(150, 200, 240), outline=(255, 255, 255), width=3)
    d.rectangle([470, 230, 490, 330], fill=(100, 65, 35))  # tree
    d.ellipse([420, 140, 540, 250], fill=(40, 120, 45))
    return img.filter(ImageFilter.SMOOTH)


if __name__ == "__main__":
    draw().save(Path(__file__).with_name("demo.jpg"), quality=90)
