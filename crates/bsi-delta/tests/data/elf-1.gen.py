"""Writes v1.c and v2.c, the sources of elf-1.old.so and elf-1.new.so: a library of 40 hidden
functions that call each other, switch on their argument (jump tables), read a table of strings
and are listed in a table of function pointers (relocations); v2 inserts one function in the
middle and lists it. Built with gcc 12.2 (Debian 12.2.0-14):

    python3 elf-1.gen.py
    gcc -O2 -shared -fPIC -s -Wl,--build-id=none -o elf-1.old.so v1.c
    gcc -O2 -shared -fPIC -s -Wl,--build-id=none -o elf-1.new.so v2.c

and for AArch64 with Debian's cross compiler (gcc-aarch64-linux-gnu, 12.2.0-14):

    aarch64-linux-gnu-gcc -O2 -shared -fPIC -s -Wl,--build-id=none -o elf-1.arm64.old.so v1.c
    aarch64-linux-gnu-gcc -O2 -shared -fPIC -s -Wl,--build-id=none -o elf-1.arm64.new.so v2.c
"""
import random
def prog(version):
    r = random.Random(7)
    out = ['#include <string.h>', '#include <stdio.h>', 'typedef int (*op)(int);']
    n = 40
    names = [f'f{i}' for i in range(n)]
    for nm in names: out.append(f'__attribute__((visibility("hidden"))) int {nm}(int);')
    out.append('static const char *messages[] = {' + ','.join(f'"message {i} of the table"' for i in range(40)) + '};')
    out.append('int counter; static int state[64];')
    for i, nm in enumerate(names):
        a, b, c = r.randrange(n), r.randrange(n), r.randrange(1, 97)
        body = [f'int {nm}(int x) {{', f'  state[{i % 64}] += x;']
        body += [f'  switch ((x + {c}) % 7) {{']
        for k in range(7):
            body.append(f'    case {k}: x = x * {r.randrange(3, 99)} + {r.randrange(1000)}; break;')
        body += ['  }',
                 f'  if (x % {c + 3} == 1) return {names[a]}(x / 3) + (int)strlen(messages[{i % 40}]);',
                 f'  if (x % {c + 5} == 2) return {names[b]}(x - 1) ^ counter;',
                 '  return x + counter;', '}']
        out += body
        if version == 2 and i == 20:
            out += ['int added_check(int x) {', '  if (x < 0) { puts("negative"); return -x; }', '  return x + f3(x);', '}']
    out.append('op table[] = {' + ','.join(names) + (',added_check' if version == 2 else '') + '};')
    out.append('int run(int i, int x) { return table[i % (sizeof table / sizeof table[0])](x); }')
    return '\n'.join(out) + '\n'
for v in (1, 2):
    open(f'v{v}.c', 'w').write(prog(v))
