// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Initializable} from "@openzeppelin/contracts-upgradeable/proxy/utils/Initializable.sol";
import {Ownable2StepUpgradeable} from "@openzeppelin/contracts-upgradeable/access/Ownable2StepUpgradeable.sol";
import {UUPSUpgradeable} from "@openzeppelin/contracts-upgradeable/proxy/utils/UUPSUpgradeable.sol";
import {ERC165Upgradeable} from "@openzeppelin/contracts-upgradeable/utils/introspection/ERC165Upgradeable.sol";
import {IAppAuth, IAppAuthBasicManagement} from "./IAppAuth.sol";

/// @title DstackApp: one app's governance. Its proxy address is the app_id.
/// @notice Which compose hashes may boot, on which devices, and whether the TCB must be up to date.
contract DstackApp is
    Initializable,
    Ownable2StepUpgradeable,
    UUPSUpgradeable,
    ERC165Upgradeable,
    IAppAuth,
    IAppAuthBasicManagement
{
    mapping(bytes32 => bool) public allowedComposeHashes;
    bool private _upgradesDisabled;
    bool public allowAnyDevice;
    mapping(bytes32 => bool) public allowedDeviceIds;
    bool public requireTcbUpToDate;
    uint256[49] private __gap;

    event UpgradesDisabled();
    event AllowAnyDeviceSet(bool allowAny);
    event RequireTcbUpToDateSet(bool requireUpToDate);
    event PolicyChanged(address indexed actor, bytes32 indexed policy, bytes32 indexed value, bool enabled);

    /// @custom:oz-upgrades-unsafe-allow constructor
    constructor() {
        _disableInitializers();
    }

    /// @notice Legacy initializer (no TCB flag: requireTcbUpToDate stays false).
    function initialize(
        address initialOwner,
        bool _disableUpgrades,
        bool _allowAnyDevice,
        bytes32 initialDeviceId,
        bytes32 initialComposeHash
    ) public initializer {
        _init(initialOwner, _disableUpgrades, false, _allowAnyDevice, initialDeviceId, initialComposeHash);
    }

    function initialize(
        address initialOwner,
        bool _disableUpgrades,
        bool _requireTcbUpToDate,
        bool _allowAnyDevice,
        bytes32 initialDeviceId,
        bytes32 initialComposeHash
    ) public initializer {
        _init(initialOwner, _disableUpgrades, _requireTcbUpToDate, _allowAnyDevice, initialDeviceId, initialComposeHash);
    }

    /// @dev Event order is part of the interface (indexers replay it): the initial device, then
    /// the initial compose hash (each with its PolicyChanged), then the ownership transfer.
    function _init(
        address initialOwner,
        bool disableUpgrades_,
        bool requireTcbUpToDate_,
        bool allowAnyDevice_,
        bytes32 initialDeviceId,
        bytes32 initialComposeHash
    ) private {
        require(initialOwner != address(0), "invalid owner address");
        _upgradesDisabled = disableUpgrades_;
        allowAnyDevice = allowAnyDevice_;
        requireTcbUpToDate = requireTcbUpToDate_;
        if (initialDeviceId != bytes32(0)) {
            allowedDeviceIds[initialDeviceId] = true;
            emit DeviceAdded(initialDeviceId);
            _policy("device", initialDeviceId, true);
        }
        if (initialComposeHash != bytes32(0)) {
            allowedComposeHashes[initialComposeHash] = true;
            emit ComposeHashAdded(initialComposeHash);
            _policy("compose-hash", initialComposeHash, true);
        }
        __Ownable_init(initialOwner);
        __Ownable2Step_init();
        __UUPSUpgradeable_init();
        __ERC165_init();
    }

    function version() public pure virtual returns (uint256) {
        return 2;
    }

    function _policy(string memory name, bytes32 value, bool enabled) private {
        emit PolicyChanged(msg.sender, keccak256(bytes(name)), value, enabled);
    }

    function addComposeHash(bytes32 composeHash) external onlyOwner {
        allowedComposeHashes[composeHash] = true;
        emit ComposeHashAdded(composeHash);
        _policy("compose-hash", composeHash, true);
    }

    function removeComposeHash(bytes32 composeHash) external onlyOwner {
        allowedComposeHashes[composeHash] = false;
        emit ComposeHashRemoved(composeHash);
        _policy("compose-hash", composeHash, false);
    }

    function addDevice(bytes32 deviceId) external onlyOwner {
        allowedDeviceIds[deviceId] = true;
        emit DeviceAdded(deviceId);
        _policy("device", deviceId, true);
    }

    function removeDevice(bytes32 deviceId) external onlyOwner {
        allowedDeviceIds[deviceId] = false;
        emit DeviceRemoved(deviceId);
        _policy("device", deviceId, false);
    }

    function setAllowAnyDevice(bool _allowAnyDevice) external onlyOwner {
        allowAnyDevice = _allowAnyDevice;
        emit AllowAnyDeviceSet(_allowAnyDevice);
        _policy("allow-any-device", bytes32(0), _allowAnyDevice);
    }

    function setRequireTcbUpToDate(bool _requireUpToDate) external onlyOwner {
        requireTcbUpToDate = _requireUpToDate;
        emit RequireTcbUpToDateSet(_requireUpToDate);
        _policy("require-tcb-up-to-date", bytes32(0), _requireUpToDate);
    }

    function disableUpgrades() external onlyOwner {
        _upgradesDisabled = true;
        emit UpgradesDisabled();
        _policy("upgrades-disabled", bytes32(0), true);
    }

    function isAppAllowed(AppBootInfo calldata bootInfo)
        external
        view
        override
        returns (bool isAllowed, string memory reason)
    {
        if (requireTcbUpToDate && keccak256(bytes(bootInfo.tcbStatus)) != keccak256(bytes("UpToDate"))) {
            return (false, "TCB status is not up to date");
        }
        if (!allowedComposeHashes[bootInfo.composeHash]) {
            return (false, "Compose hash not allowed");
        }
        if (!allowAnyDevice && !allowedDeviceIds[bootInfo.deviceId]) {
            return (false, "Device not allowed");
        }
        return (true, "");
    }

    function supportsInterface(bytes4 interfaceId) public view virtual override returns (bool) {
        return interfaceId == type(IAppAuth).interfaceId
            || interfaceId == type(IAppAuthBasicManagement).interfaceId
            || super.supportsInterface(interfaceId);
    }

    function _authorizeUpgrade(address newImplementation) internal override onlyOwner {
        require(!_upgradesDisabled, "Upgrades are permanently disabled");
        _policy("implementation-upgrade", bytes32(uint256(uint160(newImplementation))), true);
    }
}
