/// The version of ShardFS, in one place: `shardfs --version`, `shardfs status`,
/// the `shardfs_build_info` metric. SwiftPM cannot run `git describe` at build
/// time, so a release bumps this constant.
public enum ShardFSVersion {
    public static let string = "0.16.0"
}
