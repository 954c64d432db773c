"""Draws DEQReg.png and the module icon (run from anywhere): a deformed grid and a fixed-point loop."""
import numpy as np
from PIL import Image, ImageDraw

S = 4 * 128  # draw large, downsample for anti-aliasing
img = Image.new("RGBA", (S, S), (0, 0, 0, 0))
d = ImageDraw.Draw(img)
d.rounded_rectangle([8, 8, S - 8, S - 8], radius=80, fill=(24, 44, 84, 255))

def warp(x, y):
    cx, cy = S / 2, S / 2
    r2 = ((x - cx) ** 2 + (y - cy) ** 2) / (S * 0.33) ** 2
    a = 0.55 * np.exp(-r2)
    c, s = np.cos(a), np.sin(a)
    return cx + c * (x - cx) - s * (y - cy), cy + s * (x - cx) + c * (y - cy)

lines = np.linspace(64, S - 64, 8)
t = np.linspace(64, S - 64, 80)
for v in lines:
    for pts in ([warp(v, u) for u in t], [warp(u, v) for u in t]):
        d.line(pts, fill=(120, 190, 255, 255), width=7, joint="curve")
# circular arrow: the fixed-point loop z -> f(z)
cx, cy, r = S / 2, S / 2, S * 0.2
d.arc([cx - r, cy - r, cx + r, cy + r], start=30, end=320, fill=(255, 190, 40, 255), width=26)
ang = np.deg2rad(320)
tip = (cx + r * np.cos(ang), cy + r * np.sin(ang))
dirv = np.array([-np.sin(ang), np.cos(ang)])
nrm = np.array([np.cos(ang), np.sin(ang)])
p = np.array(tip)
d.polygon([tuple(p + 46 * dirv), tuple(p + 34 * nrm - 10 * dirv), tuple(p - 34 * nrm - 10 * dirv)],
          fill=(255, 190, 40, 255))
d.ellipse([cx - 22, cy - 22, cx + 22, cy + 22], fill=(255, 80, 60, 255))
small = img.resize((128, 128), Image.LANCZOS)
import os
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
small.save(os.path.join(ROOT, "DEQReg.png"))
small.save(os.path.join(ROOT, "DEQRegistration", "Resources", "Icons", "DEQRegistration.png"))
