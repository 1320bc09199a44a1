"""Writes v1.c and v2.c, the sources of elf-2.old.so and elf-2.new.so: a library of 24 functions
that call 48 imported functions (through the procedure linkage table) and each other; v2 calls one
more import from the middle function, which gets a stub of its own in the middle of the table and
shifts the stubs after it. Built with gcc 12.2 (Debian 12.2.0-14):

    python3 elf-2.gen.py
    gcc -O2 -shared -fPIC -s -Wl,--build-id=none -o elf-2.old.so v1.c
    gcc -O2 -shared -fPIC -s -Wl,--build-id=none -o elf-2.new.so v2.c

and for AArch64 with Debian's cross compiler (gcc-aarch64-linux-gnu, 12.2.0-14):

    aarch64-linux-gnu-gcc -O2 -shared -fPIC -s -Wl,--build-id=none -o elf-2.arm64.old.so v1.c
    aarch64-linux-gnu-gcc -O2 -shared -fPIC -s -Wl,--build-id=none -o elf-2.arm64.new.so v2.c
"""
import random


def prog(version):
    r = random.Random(11)
    imports = [f'imported_{i}' for i in range(48)]
    out = [f'extern int {name}(int);' for name in imports]
    out.append('extern int imported_new(int);')
    out.append('int total;')
    funcs = [f'exported_{i}' for i in range(24)]
    for i, name in enumerate(funcs):
        body = [f'int {name}(int x) {{']
        # Each function calls two imports of its own, in order, so that the stubs follow the code.
        for k in (2 * i, 2 * i + 1):
            body.append(f'  x += {imports[k]}(x * {r.randrange(3, 99)});')
        if version == 2 and i == 12:
            body.append('  x += imported_new(x);')
        for _ in range(3):
            body.append(f'  x ^= {imports[r.randrange(48)]}(x + {r.randrange(1000)});')
        if i:
            body.append(f'  if (x & 1) x += {funcs[r.randrange(i)]}(x >> 1);')
        body += ['  total += x;', '  return x;', '}']
        out += body
    return '\n'.join(out) + '\n'


for version in (1, 2):
    with open(f'v{version}.c', 'w') as f:
        f.write(prog(version))
