#!/usr/bin/perl
# elf-runpath.pl FILE [NEWPATH]: rewrites the DT_RUNPATH/DT_RPATH string of a 64-bit little-endian ELF file
# in place (NEWPATH must not be longer than the old string), or removes the entry when NEWPATH is omitted.
# perl-base is Essential in Debian, so packaging needs neither patchelf nor chrpath.
use strict; use warnings;
my ($file, $new) = @ARGV;
open(my $fh, '+<:raw', $file) or die "elf-runpath: cannot open $file: $!\n";
local $/; my $elf = <$fh>;
die "elf-runpath: $file is not a 64-bit little-endian ELF file\n" unless substr($elf, 0, 6) eq "\x7fELF\x02\x01";
my ($phoff) = unpack('Q<', substr($elf, 0x20, 8));
my ($phentsize, $phnum) = unpack('S<S<', substr($elf, 0x36, 4));
my ($dynoff, $dynsize, @loads);
for my $i (0 .. $phnum - 1) {
    my ($type, undef, $off, $vaddr, undef, $filesz) = unpack('L<L<Q<Q<Q<Q<', substr($elf, $phoff + $i * $phentsize, 40));
    ($dynoff, $dynsize) = ($off, $filesz) if $type == 2;
    push @loads, [$off, $vaddr, $filesz] if $type == 1;
}
die "elf-runpath: $file has no dynamic section\n" unless defined $dynoff;
my (@dyn, $strtab);
for (my $p = $dynoff; $p < $dynoff + $dynsize; $p += 16) {
    my ($tag, $val) = unpack('q<Q<', substr($elf, $p, 16));
    push @dyn, [$p, $tag, $val];
    $strtab = $val if $tag == 5;
    last if $tag == 0;
}
my ($strtaboff) = map { $strtab - $_->[1] + $_->[0] } grep { $strtab >= $_->[1] && $strtab < $_->[1] + $_->[2] } @loads;
die "elf-runpath: cannot place the string table of $file\n" unless defined $strtaboff;
my @paths = grep { $_->[1] == 29 || $_->[1] == 15 } @dyn;
exit 0 if !@paths && !defined $new;
die "elf-runpath: $file has no RUNPATH to rewrite\n" unless @paths;
for my $entry (@paths) {
    my $at = $strtaboff + $entry->[2];
    my $old = unpack('Z*', substr($elf, $at));
    if (defined $new) {
        die "elf-runpath: '$new' is longer than the old RUNPATH '$old'\n" if length($new) > length($old);
        seek($fh, $at, 0); print $fh $new . ("\0" x (length($old) - length($new) + 1));
    }
}
unless (defined $new) {  # drop the entries: shift the rest of the dynamic array up, pad with DT_NULL
    my @kept = grep { $_->[1] != 29 && $_->[1] != 15 } @dyn;
    my $bytes = join('', map { pack('q<Q<', $_->[1], $_->[2]) } @kept);
    $bytes .= pack('q<Q<', 0, 0) x (@dyn - @kept);
    seek($fh, $dynoff, 0); print $fh $bytes;
}
close($fh) or die "elf-runpath: cannot write $file: $!\n";
