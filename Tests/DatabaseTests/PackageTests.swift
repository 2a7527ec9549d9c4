import Foundation
import XCTest

/// scripts/package with the debug binary: the .deb's metadata and contents, lintian, an unpacked throw-away
/// root where the binary runs, and the units' systemd-analyze exposure score. Nothing touches the real system:
/// the package is unpacked with `dpkg -x`, sysusers and tmpfiles run with `--root`.
final class PackageTests: XCTestCase {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../..").standardizedFileURL.path
    /// The figure reached in docs/packaging.md; a unit edit that raises it fails here.
    static let maximumExposure = 1.4

    func sh(_ command: String) throws -> (Int32, String) {
        try runProgram("/bin/sh", ["-c", command])
    }

    func testPackageBuildsLintsAndInstallsIntoAThrowAwayRoot() throws {
        let work = NSTemporaryDirectory() + "nolad-package-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: work) }
        let binary = try noladExecutable()
        let (rc, out) = try runProgram(Self.repository + "/scripts/package", ["--binary", binary, "--output", work])
        XCTAssertEqual(rc, 0, out)
        let deb = out.split(separator: "\n").last.map(String.init) ?? ""
        XCTAssertTrue(deb.hasSuffix("/nolad_0.1.0_\(try sh("dpkg --print-architecture").1.trimmingCharacters(in: .whitespacesAndNewlines)).deb"), deb)

        let (_, info) = try sh("dpkg-deb --info '\(deb)'")
        for field in ["Package: nolad", "Version: 0.1.0", "libpq5", "libopenblas0", "libjpeg62-turbo", "libpng16-16",
                      "libsystemd0", "systemd", "postinst", "prerm", "postrm", "conffiles"] {
            XCTAssertTrue(info.contains(field), "dpkg-deb --info lacks \(field):\n\(info)")
        }
        XCTAssertEqual(try sh("dpkg-deb --ctrl-tarfile '\(deb)' | tar -xOf - ./conffiles").1, "/etc/nolad/nolad.yaml\n")
        let postinst = try sh("dpkg-deb --ctrl-tarfile '\(deb)' | tar -xOf - ./postinst").1
        XCTAssertTrue(postinst.contains("systemd-sysusers") && postinst.contains("daemon-reload"), postinst)
        XCTAssertFalse(postinst.contains("systemctl enable") || postinst.contains("systemctl start"), "postinst must not enable or start nolad")

        let (_, contents) = try sh("dpkg-deb --contents '\(deb)'")
        for path in ["./usr/bin/nolad", "./usr/share/nolad/migrations/0001_", "./usr/lib/systemd/system/nolad.service",
                     "./usr/lib/systemd/system/nolad@.service", "./usr/lib/sysusers.d/nolad.conf", "./usr/lib/tmpfiles.d/nolad.conf",
                     "./etc/nolad/nolad.yaml", "./usr/share/doc/nolad/copyright", "./usr/share/doc/nolad/changelog.gz",
                     "./usr/share/lintian/overrides/nolad", "root/root"] {
            XCTAssertTrue(contents.contains(path), "the package lacks \(path):\n\(contents)")
        }

        let (lintRC, lint) = try sh("lintian --no-cfg --fail-on error,warning '\(deb)' 2>&1 | grep -v 'running with root privileges'; exit 0")
        XCTAssertEqual(lintRC, 0)
        XCTAssertEqual(lint, "", "lintian reports tags not explained in packaging/lintian-overrides:\n\(lint)")

        let root = work + "/root"
        XCTAssertEqual(try sh("dpkg -x '\(deb)' '\(root)'").0, 0)
        // RUNPATH names /usr/lib/nolad of the real system; outside a chroot the unpacked copy stands in for it.
        let environment = ["PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": root + "/usr/lib/nolad"]
        let (versionRC, version) = try runProgram(root + "/usr/bin/nolad", ["--version"], environment: environment)
        XCTAssertEqual(versionRC, 0, version)
        XCTAssertEqual(version.trimmingCharacters(in: .whitespacesAndNewlines), "0.1.0")
        let (helpRC, help) = try runProgram(root + "/usr/bin/nolad", ["migrate", "--help"], environment: environment)
        XCTAssertEqual(helpRC, 0, help)
        // The installed binary finds its libraries only in the package (no toolchain path in RUNPATH).
        let (_, dynamic) = try sh("readelf -d '\(root)/usr/bin/nolad'")
        XCTAssertFalse(dynamic.contains("/opt/") || dynamic.contains("ORIGIN") || dynamic.contains(".build"), dynamic)
        let migrations = try FileManager.default.contentsOfDirectory(atPath: root + "/usr/share/nolad/migrations")
        XCTAssertEqual(migrations.filter { $0.hasSuffix(".sql") }.count,
                       try FileManager.default.contentsOfDirectory(atPath: Self.repository + "/Migrations").filter { $0.hasSuffix(".sql") }.count)

        // What postinst runs, against the throw-away root: the user, then the folders.
        try FileManager.default.createDirectory(atPath: root + "/etc", withIntermediateDirectories: true)
        XCTAssertEqual(try sh("systemd-sysusers --root='\(root)' '\(root)/usr/lib/sysusers.d/nolad.conf' 2>&1").0, 0)
        let passwd = try String(contentsOfFile: root + "/etc/passwd", encoding: .utf8)
        XCTAssertTrue(passwd.contains("nolad:x:") && passwd.contains(":/var/lib/nolad:"), passwd)
        let (tmpRC, tmpOut) = try sh("systemd-tmpfiles --root='\(root)' --create '\(root)/usr/lib/tmpfiles.d/nolad.conf' 2>&1")
        XCTAssertEqual(tmpRC, 0, tmpOut)
        var isDir: ObjCBool = false
        XCTAssertTrue(FileManager.default.fileExists(atPath: root + "/var/lib/nolad/models", isDirectory: &isDir) && isDir.boolValue)
    }

    func testUnitsExposureScoreStaysAtOrBelowTheDocumentedFigure() throws {
        for unit in ["nolad.service", "nolad@.service"] {
            let (rc, out) = try sh("systemd-analyze security --offline=true '\(Self.repository)/Systemd/\(unit)' 2>&1")
            XCTAssertEqual(rc, 0, out)
            guard let line = out.split(separator: "\n").first(where: { $0.contains("Overall exposure level") }),
                  let score = line.split(separator: ":").last?.split(separator: " ").first.flatMap({ Double($0) }) else {
                return XCTFail("no exposure level in:\n\(out)")
            }
            XCTAssertLessThanOrEqual(score, Self.maximumExposure, "\(unit): \(line)")
            let (_, verify) = try sh("systemd-analyze verify '\(Self.repository)/Systemd/\(unit)' 2>&1")
            // The only complaint allowed here is the binary this host has not installed at /usr/bin/nolad.
            let complaints = verify.split(separator: "\n").filter { !$0.contains("/usr/bin/nolad is not executable") }
            XCTAssertEqual(complaints, [], verify)
        }
    }
}
